-- vfio-user dissector for Wireshark and tshark, shipped with vfioproxy.
--
-- Reads the pcapng files `vfioproxy trace export --format pcapng` writes
-- (docs/pcapng.md): LINKTYPE_WIRESHARK_UPPER_PDU packets whose exported-PDU
-- tag 12 names the dissector "vfio_user", each one the vfioproxy
-- pseudo-header (little-endian, with TLVs) and then the message bytes as the
-- trace holds them. The body layouts are vfioproxy's codec's
-- (vfioproxy/protocol/bodies.py, protocol.md §2); the fields named like the
-- display filter of `vfioproxy trace show -Y` (vfioproxy/trace/filter.py
-- FIELDS) carry the same values under `vfio_user.`.
--
--   tshark -2 -X lua_script:$(vfioproxy wireshark --path) -r s.pcapng
--   vfioproxy wireshark --install        # into the personal Lua plugins folder
--
-- Written for Wireshark 4.0 (Lua 5.2) and later (Lua 5.3/5.4): integers go
-- through the BitOp library (`bit`) and math.floor, never 5.3 operators.

local PSEUDO_VERSION = 1
local PSEUDO_SIZE = 48
local HEADER_SIZE = 16

local vfio_user = Proto("vfio_user", "vfio-user")

-- ------------------------------------------------------------------ names
-- (tests/test_wireshark.py checks these tables against vfioproxy's enums)

local COMMANDS = {
    [1] = "VERSION", [2] = "DMA_MAP", [3] = "DMA_UNMAP", [4] = "DEVICE_GET_INFO",
    [5] = "DEVICE_GET_REGION_INFO", [6] = "DEVICE_GET_REGION_IO_FDS",
    [7] = "DEVICE_GET_IRQ_INFO", [8] = "DEVICE_SET_IRQS", [9] = "REGION_READ",
    [10] = "REGION_WRITE", [11] = "DMA_READ", [12] = "DMA_WRITE", [13] = "DEVICE_RESET",
    [14] = "DIRTY_PAGES(retired)", [15] = "REGION_WRITE_MULTI", [16] = "DEVICE_FEATURE",
    [17] = "MIG_DATA_READ", [18] = "MIG_DATA_WRITE",
}

local REGIONS = {
    [0] = "BAR0", [1] = "BAR1", [2] = "BAR2", [3] = "BAR3", [4] = "BAR4", [5] = "BAR5",
    [6] = "ROM", [7] = "CONFIG", [8] = "VGA",
}

local IRQ_INDEXES = { [0] = "INTX", [1] = "MSI", [2] = "MSIX", [3] = "ERR", [4] = "REQ" }

local FEATURES = {
    [1] = "MIGRATION", [2] = "MIG_DEVICE_STATE", [6] = "DMA_LOGGING_START",
    [7] = "DMA_LOGGING_STOP", [8] = "DMA_LOGGING_REPORT",
}

local MIGRATION_STATES = {
    [0] = "ERROR", [1] = "STOP", [2] = "RUNNING", [3] = "STOP_COPY", [4] = "RESUMING",
    [5] = "RUNNING_P2P", [6] = "PRE_COPY", [7] = "PRE_COPY_P2P",
}

local REGION_CAPS = { [1] = "SPARSE_MMAP", [2] = "TYPE", [3] = "MSIX_MAPPABLE" }

-- Linux errno names, as Python's errno.errorcode gives them
local ERRNOS = {
    [1] = "EPERM", [2] = "ENOENT", [3] = "ESRCH", [4] = "EINTR", [5] = "EIO", [6] = "ENXIO",
    [7] = "E2BIG", [8] = "ENOEXEC", [9] = "EBADF", [10] = "ECHILD", [11] = "EAGAIN",
    [12] = "ENOMEM", [13] = "EACCES", [14] = "EFAULT", [15] = "ENOTBLK", [16] = "EBUSY",
    [17] = "EEXIST", [18] = "EXDEV", [19] = "ENODEV", [20] = "ENOTDIR", [21] = "EISDIR",
    [22] = "EINVAL", [23] = "ENFILE", [24] = "EMFILE", [25] = "ENOTTY", [26] = "ETXTBSY",
    [27] = "EFBIG", [28] = "ENOSPC", [29] = "ESPIPE", [30] = "EROFS", [31] = "EMLINK",
    [32] = "EPIPE", [33] = "EDOM", [34] = "ERANGE", [35] = "EDEADLOCK", [36] = "ENAMETOOLONG",
    [37] = "ENOLCK", [38] = "ENOSYS", [39] = "ENOTEMPTY", [40] = "ELOOP", [42] = "ENOMSG",
    [43] = "EIDRM", [44] = "ECHRNG", [45] = "EL2NSYNC", [46] = "EL3HLT", [47] = "EL3RST",
    [48] = "ELNRNG", [49] = "EUNATCH", [50] = "ENOCSI", [51] = "EL2HLT", [52] = "EBADE",
    [53] = "EBADR", [54] = "EXFULL", [55] = "ENOANO", [56] = "EBADRQC", [57] = "EBADSLT",
    [59] = "EBFONT", [60] = "ENOSTR", [61] = "ENODATA", [62] = "ETIME", [63] = "ENOSR",
    [64] = "ENONET", [65] = "ENOPKG", [66] = "EREMOTE", [67] = "ENOLINK", [68] = "EADV",
    [69] = "ESRMNT", [70] = "ECOMM", [71] = "EPROTO", [72] = "EMULTIHOP", [73] = "EDOTDOT",
    [74] = "EBADMSG", [75] = "EOVERFLOW", [76] = "ENOTUNIQ", [77] = "EBADFD", [78] = "EREMCHG",
    [79] = "ELIBACC", [80] = "ELIBBAD", [81] = "ELIBSCN", [82] = "ELIBMAX", [83] = "ELIBEXEC",
    [84] = "EILSEQ", [85] = "ERESTART", [86] = "ESTRPIPE", [87] = "EUSERS", [88] = "ENOTSOCK",
    [89] = "EDESTADDRREQ", [90] = "EMSGSIZE", [91] = "EPROTOTYPE", [92] = "ENOPROTOOPT",
    [93] = "EPROTONOSUPPORT", [94] = "ESOCKTNOSUPPORT", [95] = "ENOTSUP",
    [96] = "EPFNOSUPPORT", [97] = "EAFNOSUPPORT", [98] = "EADDRINUSE", [99] = "EADDRNOTAVAIL",
    [100] = "ENETDOWN", [101] = "ENETUNREACH", [102] = "ENETRESET", [103] = "ECONNABORTED",
    [104] = "ECONNRESET", [105] = "ENOBUFS", [106] = "EISCONN", [107] = "ENOTCONN",
    [108] = "ESHUTDOWN", [109] = "ETOOMANYREFS", [110] = "ETIMEDOUT", [111] = "ECONNREFUSED",
    [112] = "EHOSTDOWN", [113] = "EHOSTUNREACH", [114] = "EALREADY", [115] = "EINPROGRESS",
    [116] = "ESTALE", [117] = "EUCLEAN", [118] = "ENOTNAM", [119] = "ENAVAIL",
    [120] = "EISNAM", [121] = "EREMOTEIO", [122] = "EDQUOT", [123] = "ENOMEDIUM",
    [124] = "EMEDIUMTYPE", [125] = "ECANCELED", [126] = "ENOKEY", [127] = "EKEYEXPIRED",
    [128] = "EKEYREVOKED", [129] = "EKEYREJECTED", [130] = "EOWNERDEAD",
    [131] = "ENOTRECOVERABLE", [132] = "ERFKILL",
}

local RECORDS = { [0] = "message", [1] = "torn message", [2] = "event" }
local DIRECTIONS = { [0] = "c2s", [1] = "s2c" }
local DMA_LAYOUTS = { [0] = "not known yet (spec)", [1] = "spec", [2] = "qemu" }
local TLV_TYPES = {
    [1] = "violation", [2] = "register", [3] = "step", [4] = "fd", [5] = "event kind",
    [6] = "event data", [7] = "injection", [8] = "latency", [9] = "torn",
}
local MESSAGE_TYPES = { [0] = "command", [1] = "reply" }

-- ------------------------------------------------------------------ fields

local F = {}
local function field(key, value) F[key] = value end

-- the pseudo-header
field("pseudo", ProtoField.none("vfio_user.pseudo", "vfioproxy pseudo-header"))
field("magic", ProtoField.string("vfio_user.pseudo.magic", "Magic"))
field("pversion", ProtoField.uint8("vfio_user.pseudo.version", "Pseudo-header version"))
field("record", ProtoField.uint8("vfio_user.pseudo.record", "Record", base.DEC, RECORDS))
field("pdir", ProtoField.uint8("vfio_user.pseudo.dir", "Direction byte", base.DEC))
field("pflags", ProtoField.uint8("vfio_user.pseudo.flags", "Record flags", base.HEX))
field("pf_violation", ProtoField.bool("vfio_user.pseudo.flags.violation",
    "Protocol violation found", 8, nil, 0x01))
field("pf_inject", ProtoField.bool("vfio_user.pseudo.flags.inject",
    "Fault injection acted", 8, nil, 0x02))
field("pf_cut", ProtoField.bool("vfio_user.pseudo.flags.cut_short",
    "Record holds fewer bytes than the wire", 8, nil, 0x04))
field("pf_paired", ProtoField.bool("vfio_user.pseudo.flags.paired",
    "request_seq set", 8, nil, 0x08))
field("t_ns", ProtoField.uint64("vfio_user.pseudo.t_ns", "Trace time (ns)"))
field("request_seq", ProtoField.uint64("vfio_user.request_seq", "Request seq"))
field("wire_length", ProtoField.uint32("vfio_user.wire_length", "Bytes on the wire"))
field("dma_layout", ProtoField.uint8("vfio_user.dma_layout", "DMA_READ/DMA_WRITE layout",
    base.DEC, DMA_LAYOUTS))
field("reserved", ProtoField.uint16("vfio_user.pseudo.reserved", "Reserved", base.HEX))
field("tlv_length", ProtoField.uint32("vfio_user.pseudo.tlv_length", "TLV bytes"))
field("tlv", ProtoField.none("vfio_user.tlv", "TLV"))
field("tlv_type", ProtoField.uint16("vfio_user.tlv.type", "Type", base.DEC, TLV_TYPES))
field("tlv_len", ProtoField.uint16("vfio_user.tlv.length", "Length"))
field("tlv_value", ProtoField.bytes("vfio_user.tlv.value", "Value"))

-- the display filter's fields (vfioproxy/trace/filter.py FIELDS)
field("seq", ProtoField.uint64("vfio_user.seq", "Seq"))
field("session", ProtoField.uint32("vfio_user.session", "Session"))
field("dir", ProtoField.string("vfio_user.dir", "Direction"))
field("kind", ProtoField.string("vfio_user.kind", "Kind"))
field("t", ProtoField.double("vfio_user.t", "Seconds since the session's first message"))
field("latency", ProtoField.double("vfio_user.latency", "Latency (us)"))
field("time", ProtoField.relative_time("vfio_user.time", "Response time"))
field("errno", ProtoField.uint32("vfio_user.errno", "Errno", base.DEC, ERRNOS))
field("fds", ProtoField.uint8("vfio_user.fds", "Fds carried"))
field("fd", ProtoField.none("vfio_user.fd", "Fd"))
field("fd_size", ProtoField.uint64("vfio_user.fd.size", "Size"))
field("fd_kind", ProtoField.string("vfio_user.fd.kind", "Kind"))
field("violation", ProtoField.bool("vfio_user.violation", "Protocol violation"))
field("violation_text", ProtoField.string("vfio_user.violation.text", "Violation"))
field("inject", ProtoField.bool("vfio_user.inject", "Fault injection acted"))
field("inject_event", ProtoField.string("vfio_user.inject.event", "Inject event"))
field("register", ProtoField.string("vfio_user.register", "Config register"))
field("step", ProtoField.string("vfio_user.step", "Realize step"))
field("region", ProtoField.uint32("vfio_user.region", "Region", base.DEC, REGIONS))
field("offset", ProtoField.uint64("vfio_user.offset", "Offset", base.HEX))
field("count", ProtoField.uint64("vfio_user.count", "Count"))
field("data", ProtoField.bytes("vfio_user.data", "Data"))

-- request <-> reply
field("response_in", ProtoField.framenum("vfio_user.response_in", "Response in", base.NONE,
    frametype and frametype.RESPONSE or nil))
field("response_to", ProtoField.framenum("vfio_user.response_to", "Response to", base.NONE,
    frametype and frametype.REQUEST or nil))

-- events and torn messages
field("event_kind", ProtoField.string("vfio_user.event.kind", "Event"))
field("event_data", ProtoField.string("vfio_user.event.data", "Event data"))
field("torn", ProtoField.string("vfio_user.torn", "Torn message"))
field("torn_bytes", ProtoField.bytes("vfio_user.torn.bytes", "Bytes that arrived"))

-- the header
field("header", ProtoField.none("vfio_user.header", "Header"))
field("msg_id", ProtoField.uint16("vfio_user.msg_id", "Message id"))
field("command", ProtoField.uint16("vfio_user.command", "Command", base.DEC, COMMANDS))
field("size", ProtoField.uint32("vfio_user.size", "Size"))
field("flags", ProtoField.uint32("vfio_user.flags", "Flags", base.HEX))
field("flags_type", ProtoField.uint32("vfio_user.flags.type", "Type", base.DEC,
    MESSAGE_TYPES, 0x0F))
field("flags_no_reply", ProtoField.bool("vfio_user.flags.no_reply", "No reply", 32, nil, 0x10))
field("flags_error", ProtoField.bool("vfio_user.flags.error", "Error", 32, nil, 0x20))
field("error_no", ProtoField.uint32("vfio_user.error_no", "Error field", base.DEC, ERRNOS))

-- bodies
field("body", ProtoField.none("vfio_user.body", "Body"))
field("argsz", ProtoField.uint32("vfio_user.argsz", "argsz"))
field("index", ProtoField.uint32("vfio_user.index", "Index"))
field("trailing", ProtoField.bytes("vfio_user.trailing", "Trailing bytes"))
field("error_payload", ProtoField.bytes("vfio_user.error_payload", "Error reply payload"))
field("raw", ProtoField.bytes("vfio_user.raw", "Undecoded payload"))
field("major", ProtoField.uint16("vfio_user.version.major", "Major"))
field("minor", ProtoField.uint16("vfio_user.version.minor", "Minor"))
field("json", ProtoField.string("vfio_user.version.json", "Capabilities (JSON)"))
field("iova", ProtoField.uint64("vfio_user.iova", "IOVA", base.HEX))
field("address", ProtoField.uint64("vfio_user.address", "Address", base.HEX))
field("map_flags", ProtoField.uint32("vfio_user.dma_map.flags", "Flags", base.HEX))
field("map_read", ProtoField.bool("vfio_user.dma_map.flags.read", "READ", 32, nil, 0x1))
field("map_write", ProtoField.bool("vfio_user.dma_map.flags.write", "WRITE", 32, nil, 0x2))
field("map_mmap", ProtoField.bool("vfio_user.dma_map.flags.mmap", "MMAP", 32, nil, 0x4))
field("map_file_io", ProtoField.bool("vfio_user.dma_map.flags.file_io", "FILE_IO", 32, nil, 0x8))
field("map_size", ProtoField.uint64("vfio_user.dma_map.size", "Size", base.HEX))
field("unmap_flags", ProtoField.uint32("vfio_user.dma_unmap.flags", "Flags", base.HEX))
field("unmap_bitmap_flag", ProtoField.bool("vfio_user.dma_unmap.flags.get_dirty_bitmap",
    "GET_DIRTY_BITMAP", 32, nil, 0x1))
field("unmap_all", ProtoField.bool("vfio_user.dma_unmap.flags.all", "ALL", 32, nil, 0x2))
field("unmap_size", ProtoField.uint64("vfio_user.dma_unmap.size", "Size", base.HEX))
field("bitmap_pgsize", ProtoField.uint64("vfio_user.dma_unmap.bitmap.pgsize", "Bitmap page size",
    base.HEX))
field("bitmap_size", ProtoField.uint64("vfio_user.dma_unmap.bitmap.size", "Bitmap size"))
field("bitmap", ProtoField.bytes("vfio_user.dma_unmap.bitmap", "Dirty bitmap"))
field("dev_flags", ProtoField.uint32("vfio_user.device_info.flags", "Flags", base.HEX))
field("dev_reset", ProtoField.bool("vfio_user.device_info.flags.reset", "RESET", 32, nil, 0x1))
field("dev_pci", ProtoField.bool("vfio_user.device_info.flags.pci", "PCI", 32, nil, 0x2))
field("dev_caps", ProtoField.bool("vfio_user.device_info.flags.caps", "CAPS", 32, nil, 0x80))
field("num_regions", ProtoField.uint32("vfio_user.device_info.num_regions", "Regions"))
field("num_irqs", ProtoField.uint32("vfio_user.device_info.num_irqs", "IRQs"))
field("ri_flags", ProtoField.uint32("vfio_user.region_info.flags", "Flags", base.HEX))
field("ri_read", ProtoField.bool("vfio_user.region_info.flags.read", "READ", 32, nil, 0x1))
field("ri_write", ProtoField.bool("vfio_user.region_info.flags.write", "WRITE", 32, nil, 0x2))
field("ri_mmap", ProtoField.bool("vfio_user.region_info.flags.mmap", "MMAP", 32, nil, 0x4))
field("ri_caps", ProtoField.bool("vfio_user.region_info.flags.caps", "CAPS", 32, nil, 0x8))
field("cap_offset", ProtoField.uint32("vfio_user.region_info.cap_offset", "Capability offset"))
field("ri_size", ProtoField.uint64("vfio_user.region_info.size", "Region size", base.HEX))
field("cap", ProtoField.none("vfio_user.cap", "Capability"))
field("cap_id", ProtoField.uint16("vfio_user.cap.id", "Id", base.DEC, REGION_CAPS))
field("cap_version", ProtoField.uint16("vfio_user.cap.version", "Version"))
field("cap_next", ProtoField.uint32("vfio_user.cap.next", "Next"))
field("nr_areas", ProtoField.uint32("vfio_user.cap.nr_areas", "Areas"))
field("cap_reserved", ProtoField.uint32("vfio_user.cap.reserved", "Reserved"))
field("area_offset", ProtoField.uint64("vfio_user.cap.area.offset", "Area offset", base.HEX))
field("area_size", ProtoField.uint64("vfio_user.cap.area.size", "Area size", base.HEX))
field("cap_type", ProtoField.uint32("vfio_user.cap.type", "Type", base.HEX))
field("cap_subtype", ProtoField.uint32("vfio_user.cap.subtype", "Subtype", base.HEX))
field("cap_data", ProtoField.bytes("vfio_user.cap.data", "Data"))
field("iofds_flags", ProtoField.uint32("vfio_user.io_fds.flags", "Flags", base.HEX))
field("iofd", ProtoField.none("vfio_user.io_fd", "Sub-region"))
field("iofd_offset", ProtoField.uint64("vfio_user.io_fd.offset", "Offset", base.HEX))
field("iofd_size", ProtoField.uint64("vfio_user.io_fd.size", "Size", base.HEX))
field("iofd_fd_index", ProtoField.uint32("vfio_user.io_fd.fd_index", "Fd index"))
field("iofd_type", ProtoField.uint32("vfio_user.io_fd.type", "Type"))
field("iofd_flags", ProtoField.uint32("vfio_user.io_fd.flags", "Flags", base.HEX))
field("iofd_shadow_fd", ProtoField.uint32("vfio_user.io_fd.shadow_mem_fd_index",
    "Shadow memory fd index"))
field("iofd_shadow_offset", ProtoField.uint64("vfio_user.io_fd.shadow_offset", "Shadow offset",
    base.HEX))
field("iofd_datamatch", ProtoField.uint64("vfio_user.io_fd.datamatch", "Datamatch", base.HEX))
field("iofd_padding", ProtoField.uint32("vfio_user.io_fd.padding", "Padding"))
field("irq_index", ProtoField.uint32("vfio_user.irq.index", "IRQ index", base.DEC, IRQ_INDEXES))
field("irq_info_flags", ProtoField.uint32("vfio_user.irq_info.flags", "Flags", base.HEX))
field("irq_eventfd", ProtoField.bool("vfio_user.irq_info.flags.eventfd", "EVENTFD", 32, nil, 0x1))
field("irq_maskable", ProtoField.bool("vfio_user.irq_info.flags.maskable", "MASKABLE", 32, nil,
    0x2))
field("irq_automasked", ProtoField.bool("vfio_user.irq_info.flags.automasked", "AUTOMASKED", 32,
    nil, 0x4))
field("irq_noresize", ProtoField.bool("vfio_user.irq_info.flags.noresize", "NORESIZE", 32, nil,
    0x8))
field("irq_set_flags", ProtoField.uint32("vfio_user.irq_set.flags", "Flags", base.HEX))
field("irq_data_none", ProtoField.bool("vfio_user.irq_set.flags.data_none", "DATA_NONE", 32, nil,
    0x1))
field("irq_data_bool", ProtoField.bool("vfio_user.irq_set.flags.data_bool", "DATA_BOOL", 32, nil,
    0x2))
field("irq_data_eventfd", ProtoField.bool("vfio_user.irq_set.flags.data_eventfd", "DATA_EVENTFD",
    32, nil, 0x4))
field("irq_mask", ProtoField.bool("vfio_user.irq_set.flags.action_mask", "ACTION_MASK", 32, nil,
    0x8))
field("irq_unmask", ProtoField.bool("vfio_user.irq_set.flags.action_unmask", "ACTION_UNMASK", 32,
    nil, 0x10))
field("irq_trigger", ProtoField.bool("vfio_user.irq_set.flags.action_trigger", "ACTION_TRIGGER",
    32, nil, 0x20))
field("irq_start", ProtoField.uint32("vfio_user.irq_set.start", "Start"))
field("wr_cnt", ProtoField.uint64("vfio_user.write_multi.wr_cnt", "Writes"))
field("write", ProtoField.none("vfio_user.write_multi.write", "Write"))
field("write_offset", ProtoField.uint64("vfio_user.write_multi.offset", "Offset", base.HEX))
field("write_region", ProtoField.uint32("vfio_user.write_multi.region", "Region", base.DEC,
    REGIONS))
field("write_count", ProtoField.uint32("vfio_user.write_multi.count", "Count"))
field("write_data", ProtoField.bytes("vfio_user.write_multi.data", "Data"))
field("feat_flags", ProtoField.uint32("vfio_user.feature.flags", "Flags", base.HEX))
field("feat_index", ProtoField.uint32("vfio_user.feature.index", "Feature", base.DEC, FEATURES,
    0xFFFF))
field("feat_get", ProtoField.bool("vfio_user.feature.get", "GET", 32, nil, 0x10000))
field("feat_set", ProtoField.bool("vfio_user.feature.set", "SET", 32, nil, 0x20000))
field("feat_probe", ProtoField.bool("vfio_user.feature.probe", "PROBE", 32, nil, 0x40000))
field("mig_flags", ProtoField.uint64("vfio_user.feature.migration_flags", "Migration flags",
    base.HEX))
field("device_state", ProtoField.uint32("vfio_user.feature.device_state", "Device state",
    base.DEC, MIGRATION_STATES))
field("data_fd", ProtoField.uint32("vfio_user.feature.data_fd", "Data fd"))
field("page_size", ProtoField.uint64("vfio_user.feature.page_size", "Page size", base.HEX))
field("num_ranges", ProtoField.uint32("vfio_user.feature.num_ranges", "Ranges"))
field("feat_reserved", ProtoField.uint32("vfio_user.feature.reserved", "Reserved"))
field("range_iova", ProtoField.uint64("vfio_user.feature.range.iova", "Range IOVA", base.HEX))
field("range_length", ProtoField.uint64("vfio_user.feature.range.length", "Range length",
    base.HEX))
field("log_iova", ProtoField.uint64("vfio_user.feature.iova", "IOVA", base.HEX))
field("log_length", ProtoField.uint64("vfio_user.feature.length", "Length", base.HEX))
field("log_bitmap", ProtoField.bytes("vfio_user.feature.bitmap", "Bitmap"))
field("mig_size", ProtoField.uint32("vfio_user.mig_data.size", "Size"))

do
    local list = {}
    for _, f in pairs(F) do list[#list + 1] = f end
    vfio_user.fields = list
end

local E = {
    violation = ProtoExpert.new("vfio_user.expert.violation", "Protocol violation",
        expert.group.PROTOCOL, expert.severity.WARN),
    error_reply = ProtoExpert.new("vfio_user.expert.error_reply", "Error reply",
        expert.group.RESPONSE_CODE, expert.severity.NOTE),
    torn = ProtoExpert.new("vfio_user.expert.torn", "Torn message",
        expert.group.MALFORMED, expert.severity.ERROR),
    cut_short = ProtoExpert.new("vfio_user.expert.cut_short",
        "Record holds fewer bytes than the wire carried",
        expert.group.UNDECODED, expert.severity.NOTE),
    malformed = ProtoExpert.new("vfio_user.expert.malformed", "Malformed body",
        expert.group.MALFORMED, expert.severity.ERROR),
    pseudo = ProtoExpert.new("vfio_user.expert.pseudo_header", "Bad vfioproxy pseudo-header",
        expert.group.MALFORMED, expert.severity.ERROR),
}
vfio_user.experts = { E.violation, E.error_reply, E.torn, E.cut_short, E.malformed, E.pseudo }

-- ------------------------------------------------------------------ state
-- Filled on the first pass (frames in trace order); tshark needs -2 for
-- vfio_user.response_in, which a later frame sets.

local frame_of_seq, reply_frame_of_seq, session_start, feature_of_seq

local function reset()
    frame_of_seq = {}        -- seq -> frame number
    reply_frame_of_seq = {}  -- request seq -> frame number of its reply
    session_start = {}       -- session -> t_ns (ns, number) of its first message
    feature_of_seq = {}      -- DEVICE_FEATURE command seq -> feature index
end
reset()
vfio_user.init = reset  -- a new capture file: forget the last one's

-- ------------------------------------------------------------------ helpers

local band = bit.band
-- a Lua 5.3/5.4 float that holds an integer, as an integer (so that it prints
-- as 26, not 26.0); Lua 5.2 has one number type, printed as 26 already
local int = math.tointeger or function(n) return n end

local function hex(value)
    -- a number or UInt64 as 0x..., without leading zeros
    if type(value) == "number" then return string.format("0x%x", value) end
    local digits = value:tohex():gsub("^0+", "")
    return "0x" .. (digits ~= "" and digits or "0")
end

local function name_of(names, value, fallback)
    return names[value] or fallback(value)
end

local function command_name(value)
    return name_of(COMMANDS, value, function(v) return "CMD_" .. v end)
end

local function region_name(value)
    return name_of(REGIONS, value, function(v) return "REGION" .. v end)
end

local function errno_name(value)
    return name_of(ERRNOS, value, tostring)
end

local function irq_name(value)
    return name_of(IRQ_INDEXES, value, tostring)
end

-- ------------------------------------------------------------------ bodies
-- Each takes (ctx, tree) and returns false when the payload is too short
-- for the body's fixed part (the codec keeps it raw then): nothing is added
-- in that case. ctx: tvb, o (payload offset in tvb), n (payload length),
-- info (a list of Info column words), plus what the header says.

local function range(ctx, at, length)
    -- payload bytes [at, at + length), as far as the packet holds them (the
    -- export cuts a message longer than a packet may be: ctx.n is the
    -- message's payload length, ctx.held what the packet has of it)
    local held = math.max(0, math.min(length, ctx.held - at))
    return ctx.tvb(ctx.o + math.min(at, ctx.held), held)
end

local function u32(ctx, at) return int(range(ctx, at, 4):le_uint()) end
local function u64(ctx, at) return range(ctx, at, 8):le_uint64() end

local function add_bytes(ctx, tree, f, at, length)
    -- a bytes field of `length` payload bytes from `at`; none when empty
    -- (the filter's data is b"" then: `vfio_user.data` means there are some)
    local r = range(ctx, at, length)
    if r:len() > 0 then tree:add(f, r) end
end

local function add_trailing(ctx, tree, at)
    if ctx.n > at then add_bytes(ctx, tree, F.trailing, at, ctx.n - at) end
end

local function add_flags(tree, f, r, subs)
    local item = tree:add_le(f, r)
    for _, sub in ipairs(subs) do item:add_le(sub, r) end
    return item
end

local function version_body(ctx, tree)
    if ctx.n < 4 then return false end
    tree:add_le(F.major, range(ctx, 0, 2))
    tree:add_le(F.minor, range(ctx, 2, 2))
    local major, minor = int(range(ctx, 0, 2):le_uint()), int(range(ctx, 2, 2):le_uint())
    ctx.info[#ctx.info + 1] = major .. "." .. minor
    if ctx.n > 4 then
        local rest = range(ctx, 4, ctx.n - 4)
        local text = rest:raw()
        local nul = text:find("\0", 1, true)
        local json_length = nul and nul - 1 or #text
        if json_length > 0 then
            tree:add(F.json, range(ctx, 4, json_length), text:sub(1, json_length))
        end
        if nul then add_trailing(ctx, tree, 4 + nul) end
    end
    return true
end

local function dma_map_body(ctx, tree)
    if ctx.n < 32 then return false end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.map_flags, range(ctx, 4, 4),
        { F.map_read, F.map_write, F.map_mmap, F.map_file_io })
    tree:add_le(F.offset, range(ctx, 8, 8))
    tree:add_le(F.iova, range(ctx, 16, 8))
    tree:add_le(F.map_size, range(ctx, 24, 8))
    ctx.info[#ctx.info + 1] = "iova=" .. hex(u64(ctx, 16)) .. " size=" .. hex(u64(ctx, 24))
    add_trailing(ctx, tree, 32)
    return true
end

local function dma_unmap_body(ctx, tree)
    if ctx.n < 24 then return false end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.unmap_flags, range(ctx, 4, 4), { F.unmap_bitmap_flag, F.unmap_all })
    tree:add_le(F.iova, range(ctx, 8, 8))
    tree:add_le(F.unmap_size, range(ctx, 16, 8))
    ctx.info[#ctx.info + 1] = "iova=" .. hex(u64(ctx, 8)) .. " size=" .. hex(u64(ctx, 16))
    local pos = 24
    if band(u32(ctx, 4), 1) ~= 0 and ctx.n >= 40 then
        tree:add_le(F.bitmap_pgsize, range(ctx, 24, 8))
        tree:add_le(F.bitmap_size, range(ctx, 32, 8))
        local want = int(u64(ctx, 32):tonumber())
        local have = math.min(want, ctx.n - 40)
        if have > 0 then tree:add(F.bitmap, range(ctx, 40, have)) end
        pos = 40 + have
    end
    add_trailing(ctx, tree, pos)
    return true
end

local function device_info_body(ctx, tree)
    if ctx.n < 16 then return false end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.dev_flags, range(ctx, 4, 4), { F.dev_reset, F.dev_pci, F.dev_caps })
    tree:add_le(F.num_regions, range(ctx, 8, 4))
    tree:add_le(F.num_irqs, range(ctx, 12, 4))
    if ctx.is_reply then
        ctx.info[#ctx.info + 1] = "regions=" .. u32(ctx, 8) .. " irqs=" .. u32(ctx, 12)
    end
    add_trailing(ctx, tree, 16)
    return true
end

-- the region-info capability chain from payload offset `first`, as the codec
-- walks it: a list of {pos, id, version, next}, or nil when the codec
-- refuses the chain (the body stays raw then)
local function region_caps(ctx, first)
    local caps, seen, pos = {}, {}, first
    while pos ~= 0 do
        if seen[pos] or pos < 32 then return nil end
        seen[pos] = true
        if pos + 8 > ctx.n then
            if #caps > 0 then break end
            return nil
        end
        local id = int(range(ctx, pos, 2):le_uint())
        local nxt = u32(ctx, pos + 4)
        local body = pos + 8
        if id == 1 then
            if ctx.n < body + 8 then return nil end
            local nr = u32(ctx, body)
            if ctx.n < body + 8 + nr * 16 then return nil end
        elseif id == 2 then
            if ctx.n < body + 8 then return nil end
        end
        caps[#caps + 1] = { pos = pos, id = id, next = nxt }
        pos = nxt
    end
    return caps
end

local function add_region_cap(ctx, tree, cap)
    local body = cap.pos + 8
    local size
    if cap.id == 1 then
        size = 16 + u32(ctx, body) * 16
    elseif cap.id == 2 then
        size = 16
    elseif cap.id == 3 then
        size = 8
    else
        size = (cap.next > cap.pos and cap.next or ctx.n) - cap.pos
    end
    size = math.min(size, ctx.n - cap.pos)
    local sub = tree:add(F.cap, range(ctx, cap.pos, size))
    sub:append_text(": " .. (REGION_CAPS[cap.id] or ("cap " .. cap.id)))
    sub:add_le(F.cap_id, range(ctx, cap.pos, 2))
    sub:add_le(F.cap_version, range(ctx, cap.pos + 2, 2))
    sub:add_le(F.cap_next, range(ctx, cap.pos + 4, 4))
    if cap.id == 1 then
        local nr = u32(ctx, body)
        sub:add_le(F.nr_areas, range(ctx, body, 4))
        sub:add_le(F.cap_reserved, range(ctx, body + 4, 4))
        for i = 0, nr - 1 do
            local at = body + 8 + i * 16
            local area = sub:add_le(F.area_offset, range(ctx, at, 8))
            area:append_text(", size " .. hex(u64(ctx, at + 8)))
            sub:add_le(F.area_size, range(ctx, at + 8, 8))
        end
    elseif cap.id == 2 then
        sub:add_le(F.cap_type, range(ctx, body, 4))
        sub:add_le(F.cap_subtype, range(ctx, body + 4, 4))
    elseif cap.id ~= 3 and size > 8 then
        sub:add(F.cap_data, range(ctx, body, size - 8))
    end
end

local function region_info_body(ctx, tree)
    if ctx.n < 32 then return false end
    local flags, cap_offset = u32(ctx, 4), u32(ctx, 12)
    local caps = {}
    if band(flags, 8) ~= 0 and cap_offset ~= 0 then
        if cap_offset < 32 then return false end
        if cap_offset < ctx.n then
            caps = region_caps(ctx, cap_offset)
            if caps == nil then return false end
        end
    end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.ri_flags, range(ctx, 4, 4), { F.ri_read, F.ri_write, F.ri_mmap, F.ri_caps })
    local index = u32(ctx, 8)
    tree:add_le(F.index, range(ctx, 8, 4)):append_text(" (" .. region_name(index) .. ")")
    tree:add_le(F.cap_offset, range(ctx, 12, 4))
    tree:add_le(F.ri_size, range(ctx, 16, 8))
    tree:add_le(F.offset, range(ctx, 24, 8))
    local text = region_name(index)
    if ctx.is_reply then text = text .. " size=" .. hex(u64(ctx, 16)) end
    ctx.info[#ctx.info + 1] = text
    for _, cap in ipairs(caps) do add_region_cap(ctx, tree, cap) end
    if #caps == 0 then add_trailing(ctx, tree, 32) end
    return true
end

local function io_fds_body(ctx, tree)
    if ctx.n < 16 then return false end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    tree:add_le(F.iofds_flags, range(ctx, 4, 4))
    local index, count = u32(ctx, 8), u32(ctx, 12)
    tree:add_le(F.index, range(ctx, 8, 4)):append_text(" (" .. region_name(index) .. ")")
    tree:add(F.count, range(ctx, 12, 4), UInt64.new(count))
    ctx.info[#ctx.info + 1] = region_name(index) .. " count=" .. count
    local extra = ctx.n - 16
    local size = 0
    if count > 0 and extra > 0 then
        if extra == count * 48 then size = 48 elseif extra == count * 40 then size = 40 end
    end
    if size == 0 then
        add_trailing(ctx, tree, 16)
        return true
    end
    for i = 0, count - 1 do
        local at = 16 + i * size
        local sub = tree:add(F.iofd, range(ctx, at, size))
        sub:add_le(F.iofd_offset, range(ctx, at, 8))
        sub:add_le(F.iofd_size, range(ctx, at + 8, 8))
        sub:add_le(F.iofd_fd_index, range(ctx, at + 16, 4))
        sub:add_le(F.iofd_type, range(ctx, at + 20, 4))
        sub:add_le(F.iofd_flags, range(ctx, at + 24, 4))
        if size == 48 then
            sub:add_le(F.iofd_shadow_fd, range(ctx, at + 28, 4))
            sub:add_le(F.iofd_shadow_offset, range(ctx, at + 32, 8))
            sub:add_le(F.iofd_datamatch, range(ctx, at + 40, 8))
        else
            sub:add_le(F.iofd_padding, range(ctx, at + 28, 4))
            sub:add_le(F.iofd_datamatch, range(ctx, at + 32, 8))
        end
    end
    return true
end

local function irq_info_body(ctx, tree)
    if ctx.n < 16 then return false end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.irq_info_flags, range(ctx, 4, 4),
        { F.irq_eventfd, F.irq_maskable, F.irq_automasked, F.irq_noresize })
    tree:add_le(F.irq_index, range(ctx, 8, 4))
    tree:add(F.count, range(ctx, 12, 4), UInt64.new(u32(ctx, 12)))
    local text = irq_name(u32(ctx, 8))
    if ctx.is_reply then text = text .. " count=" .. u32(ctx, 12) end
    ctx.info[#ctx.info + 1] = text
    add_trailing(ctx, tree, 16)
    return true
end

local function irq_set_body(ctx, tree)
    if ctx.n < 20 then return false end
    local flags, count = u32(ctx, 4), u32(ctx, 16)
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.irq_set_flags, range(ctx, 4, 4),
        { F.irq_data_none, F.irq_data_bool, F.irq_data_eventfd, F.irq_mask, F.irq_unmask,
          F.irq_trigger })
    tree:add_le(F.irq_index, range(ctx, 8, 4))
    tree:add_le(F.irq_start, range(ctx, 12, 4))
    tree:add(F.count, range(ctx, 16, 4), UInt64.new(count))
    ctx.info[#ctx.info + 1] = irq_name(u32(ctx, 8)) .. " start=" .. u32(ctx, 12) ..
        " count=" .. count
    local data = 0
    if band(flags, 2) ~= 0 then data = math.min(count, ctx.n - 20) end
    add_bytes(ctx, tree, F.data, 20, data)
    add_trailing(ctx, tree, 20 + data)
    return true
end

local function region_access_body(ctx, tree)
    if ctx.n < 16 then return false end
    local region, count = u32(ctx, 8), u32(ctx, 12)
    tree:add_le(F.offset, range(ctx, 0, 8))
    tree:add_le(F.region, range(ctx, 8, 4))
    tree:add(F.count, range(ctx, 12, 4), UInt64.new(count))
    add_bytes(ctx, tree, F.data, 16, ctx.n - 16)
    ctx.info[#ctx.info + 1] = region_name(region) .. " off=" .. hex(u64(ctx, 0)) ..
        " count=" .. count
    return true
end

local function dma_access_body(ctx, tree)
    local qemu = ctx.dma_layout == 2 or ctx.n == 12
    local head = qemu and 12 or 16
    if ctx.n < head then return false end
    tree:add_le(F.address, range(ctx, 0, 8))
    local count
    if qemu then
        count = u32(ctx, 8)
        tree:add(F.count, range(ctx, 8, 4), UInt64.new(count))
    else
        count = int(u64(ctx, 8):tonumber())
        tree:add_le(F.count, range(ctx, 8, 8))
    end
    local data = math.min(count, ctx.n - head)
    add_bytes(ctx, tree, F.data, head, data)
    add_trailing(ctx, tree, head + data)
    ctx.info[#ctx.info + 1] = "addr=" .. hex(u64(ctx, 0)) .. " count=" .. count ..
        (qemu and " [qemu layout]" or "")
    return true
end

local function write_multi_body(ctx, tree)
    if ctx.n < 8 then return false end
    tree:add_le(F.wr_cnt, range(ctx, 0, 8))
    local wanted = int(u64(ctx, 0):tonumber())
    local fit = math.floor((ctx.n - 8) / 24)
    local n = math.min(wanted, fit)
    ctx.info[#ctx.info + 1] = "writes=" .. tostring(wanted)
    for i = 0, n - 1 do
        local at = 8 + i * 24
        local sub = tree:add(F.write, range(ctx, at, 24))
        sub:append_text(": " .. region_name(u32(ctx, at + 8)) .. " off=" .. hex(u64(ctx, at)))
        sub:add_le(F.write_offset, range(ctx, at, 8))
        sub:add_le(F.write_region, range(ctx, at + 8, 4))
        sub:add_le(F.write_count, range(ctx, at + 12, 4))
        sub:add(F.write_data, range(ctx, at + 16, 8))
    end
    add_trailing(ctx, tree, 8 + n * 24)
    return true
end

local function write_multi_reply_body(ctx, tree)
    if ctx.n < 8 then return false end
    tree:add_le(F.wr_cnt, range(ctx, 0, 8))
    ctx.info[#ctx.info + 1] = "done=" .. tostring(int(u64(ctx, 0):tonumber()))
    add_trailing(ctx, tree, 8)
    return true
end

local function feature_body(ctx, tree)
    if ctx.n < 8 then return false end
    local flags = u32(ctx, 4)
    tree:add_le(F.argsz, range(ctx, 0, 4))
    add_flags(tree, F.feat_flags, range(ctx, 4, 4),
        { F.feat_index, F.feat_get, F.feat_set, F.feat_probe })
    local index = int(band(flags, 0xFFFF))
    if index == 0 and ctx.is_reply and ctx.request_seq then
        index = feature_of_seq[ctx.request_seq] or 0
    end
    if not ctx.is_reply then feature_of_seq[ctx.seq] = index end
    local ops = {}
    if band(flags, 0x10000) ~= 0 then ops[#ops + 1] = "GET" end
    if band(flags, 0x20000) ~= 0 then ops[#ops + 1] = "SET" end
    if band(flags, 0x40000) ~= 0 then ops[#ops + 1] = "PROBE" end
    ctx.info[#ctx.info + 1] = (FEATURES[index] or tostring(index)) ..
        (#ops > 0 and (" " .. table.concat(ops, "|")) or "")
    local n = ctx.n - 8
    add_bytes(ctx, tree, F.data, 8, n)
    if index == 1 and n >= 8 then
        tree:add_le(F.mig_flags, range(ctx, 8, 8))
    elseif index == 2 and n >= 8 then
        tree:add_le(F.device_state, range(ctx, 8, 4))
        tree:add_le(F.data_fd, range(ctx, 12, 4))
    elseif index == 6 and n >= 16 then
        tree:add_le(F.page_size, range(ctx, 8, 8))
        tree:add_le(F.num_ranges, range(ctx, 16, 4))
        tree:add_le(F.feat_reserved, range(ctx, 20, 4))
        local fit = math.min(u32(ctx, 16), math.floor((n - 16) / 16))
        for i = 0, fit - 1 do
            local at = 24 + i * 16
            tree:add_le(F.range_iova, range(ctx, at, 8))
            tree:add_le(F.range_length, range(ctx, at + 8, 8))
        end
    elseif index == 8 and n >= 24 then
        tree:add_le(F.log_iova, range(ctx, 8, 8))
        tree:add_le(F.log_length, range(ctx, 16, 8))
        tree:add_le(F.page_size, range(ctx, 24, 8))
        if n > 24 then tree:add(F.log_bitmap, range(ctx, 32, n - 24)) end
    end
    return true
end

local function mig_data_body(ctx, tree)
    if ctx.n < 8 then return false end
    tree:add_le(F.argsz, range(ctx, 0, 4))
    tree:add_le(F.mig_size, range(ctx, 4, 4))
    local size = u32(ctx, 4)
    local data = math.min(size, ctx.n - 8)
    add_bytes(ctx, tree, F.data, 8, data)
    add_trailing(ctx, tree, 8 + data)
    ctx.info[#ctx.info + 1] = "size=" .. size
    return true
end

local function empty_body(ctx, tree)
    add_trailing(ctx, tree, 0)
    return true
end

-- body parsers per command (vfioproxy/protocol/codec.py COMMAND_PARSERS /
-- REPLY_PARSERS)
local COMMAND_BODIES = {
    [1] = version_body, [2] = dma_map_body, [3] = dma_unmap_body, [4] = device_info_body,
    [5] = region_info_body, [6] = io_fds_body, [7] = irq_info_body, [8] = irq_set_body,
    [9] = region_access_body, [10] = region_access_body, [11] = dma_access_body,
    [12] = dma_access_body, [13] = empty_body, [15] = write_multi_body, [16] = feature_body,
    [17] = mig_data_body, [18] = mig_data_body,
}
local REPLY_BODIES = {}
for command, parse in pairs(COMMAND_BODIES) do REPLY_BODIES[command] = parse end
REPLY_BODIES[2] = empty_body
REPLY_BODIES[8] = empty_body
REPLY_BODIES[15] = write_multi_reply_body
REPLY_BODIES[18] = empty_body

-- ------------------------------------------------------------------ the pseudo-header

local function read_tlvs(tvb, tree, first, stop)
    local found = { violations = {}, fds = {} }
    local pos = first
    while pos + 4 <= stop do
        local kind = int(tvb(pos, 2):le_uint())
        local length = int(tvb(pos + 2, 2):le_uint())
        if pos + 4 + length > stop then
            tree:add_proto_expert_info(E.pseudo, "TLV at " .. pos .. " runs past the TLVs")
            break
        end
        local item = tree:add(F.tlv, tvb(pos, 4 + length))
        item:append_text(": " .. (TLV_TYPES[kind] or ("type " .. kind)))
        item:add_le(F.tlv_type, tvb(pos, 2))
        item:add_le(F.tlv_len, tvb(pos + 2, 2))
        local value = length > 0 and tvb(pos + 4, length) or nil
        if value == nil then
            -- an empty value: nothing more to show
        elseif kind == 1 then
            found.violations[#found.violations + 1] = { text = value:string(ENC_UTF_8),
                                                        range = value }
        elseif kind == 2 then
            found.register = { text = value:string(ENC_UTF_8), range = value }
        elseif kind == 3 then
            found.step = { text = value:string(ENC_UTF_8), range = value }
        elseif kind == 4 and length >= 8 then
            found.fds[#found.fds + 1] = { range = value, size = tvb(pos + 4, 8),
                kind = length > 8 and tvb(pos + 12, length - 8) or nil }
        elseif kind == 5 then
            found.event_kind = value
        elseif kind == 6 then
            found.event_data = value
        elseif kind == 7 then
            found.inject = value
        elseif kind == 8 and length >= 8 then
            found.latency = value
        elseif kind == 9 then
            found.torn = value
        else
            item:add(F.tlv_value, value)
        end
        pos = pos + 4 + length
    end
    return found
end

-- ------------------------------------------------------------------ the dissector

local function message_header(tvb, tree, at)
    local header = tree:add(F.header, tvb(at, HEADER_SIZE))
    header:add_le(F.msg_id, tvb(at, 2))
    header:add_le(F.command, tvb(at + 2, 2))
    header:add_le(F.size, tvb(at + 4, 4))
    add_flags(header, F.flags, tvb(at + 8, 4), { F.flags_type, F.flags_no_reply, F.flags_error })
    header:add_le(F.error_no, tvb(at + 12, 4))
    return {
        msg_id = int(tvb(at, 2):le_uint()), command = int(tvb(at + 2, 2):le_uint()),
        size = int(tvb(at + 4, 4):le_uint()), flags = int(tvb(at + 8, 4):le_uint()),
        error = int(tvb(at + 12, 4):le_uint()),
    }
end

function vfio_user.dissector(tvb, pinfo, tree)
    pinfo.cols.protocol = "vfio-user"
    local root = tree:add(vfio_user, tvb())
    local length = int(tvb:len())
    if length < PSEUDO_SIZE or tvb(0, 4):string() ~= "VFUP" then
        root:add_proto_expert_info(E.pseudo, "no vfioproxy pseudo-header (magic VFUP)")
        pinfo.cols.info = "not a vfioproxy record"
        return
    end
    local version = int(tvb(4, 1):uint())
    local record, dir_byte, rflags = int(tvb(5, 1):uint()), int(tvb(6, 1):uint()),
        int(tvb(7, 1):uint())
    local session = int(tvb(8, 4):le_uint())
    local seq = int(tvb(12, 8):le_uint64():tonumber())
    local t_ns = int(tvb(20, 8):le_uint64():tonumber())
    local request_seq = band(rflags, 8) ~= 0 and int(tvb(28, 8):le_uint64():tonumber()) or nil
    local dma_layout = int(tvb(40, 1):uint())
    local tlv_length = int(tvb(44, 4):le_uint())
    local stop = math.min(PSEUDO_SIZE + tlv_length, length)

    local pseudo = root:add(F.pseudo, tvb(0, stop))
    pseudo:add(F.magic, tvb(0, 4))
    pseudo:add(F.pversion, tvb(4, 1))
    if version ~= PSEUDO_VERSION then
        pseudo:add_proto_expert_info(E.pseudo, "pseudo-header version " .. version ..
            ", this dissector reads version " .. PSEUDO_VERSION)
    end
    pseudo:add(F.record, tvb(5, 1))
    pseudo:add(F.pdir, tvb(6, 1))
    add_flags(pseudo, F.pflags, tvb(7, 1), { F.pf_violation, F.pf_inject, F.pf_cut, F.pf_paired })
    pseudo:add_le(F.session, tvb(8, 4))
    pseudo:add_le(F.seq, tvb(12, 8))
    pseudo:add_le(F.t_ns, tvb(20, 8))
    if request_seq then pseudo:add_le(F.request_seq, tvb(28, 8)) end
    pseudo:add_le(F.wire_length, tvb(36, 4))
    pseudo:add(F.dma_layout, tvb(40, 1))
    pseudo:add(F.fds, tvb(41, 1))
    pseudo:add_le(F.reserved, tvb(42, 2))
    pseudo:add_le(F.tlv_length, tvb(44, 4))
    if PSEUDO_SIZE + tlv_length > length then
        pseudo:add_proto_expert_info(E.pseudo, "TLVs run past the packet")
    end
    local tlv = read_tlvs(tvb, pseudo, PSEUDO_SIZE, stop)
    local mo = stop  -- the message's first byte
    local mlen = length - mo

    if not pinfo.visited then frame_of_seq[seq] = pinfo.number end

    if record == 2 then
        local kind = tlv.event_kind and tlv.event_kind:string(ENC_UTF_8) or "?"
        if tlv.event_kind then root:add(F.event_kind, tlv.event_kind) end
        local data = ""
        if tlv.event_data then
            root:add(F.event_data, tlv.event_data)
            data = " " .. tlv.event_data:string(ENC_UTF_8)
        end
        pinfo.cols.src = "vfioproxy"
        pinfo.cols.info = "#" .. seq .. " s" .. session .. " --- " .. kind .. data
        root:append_text(", event " .. kind)
        return
    end

    local dir = DIRECTIONS[dir_byte] or ("dir" .. dir_byte)
    root:add(F.dir, tvb(6, 1), dir)
    -- the Source and Destination columns: who sent it, who received it
    local sender, receiver = "client", "server"
    if dir == "s2c" then sender, receiver = "server", "client" end
    pinfo.cols.src = sender .. " s" .. session
    pinfo.cols.dst = receiver .. " s" .. session
    for _, fd in ipairs(tlv.fds) do
        local sub = root:add(F.fd, fd.range)
        local size_item = sub:add_le(F.fd_size, fd.size)
        if fd.size:le_uint64() == UInt64.max() then size_item:append_text(" (not known)") end
        if fd.kind then
            sub:add(F.fd_kind, fd.kind)
            sub:append_text(": " .. fd.kind:string(ENC_UTF_8))
        end
    end
    for _, violation in ipairs(tlv.violations) do
        root:add(F.violation_text, violation.range)
    end

    if record == 1 then
        local why = tlv.torn and tlv.torn:string(ENC_UTF_8) or "the sender closed mid-message"
        if tlv.torn then root:add(F.torn, tlv.torn) end
        if mlen > 0 then root:add(F.torn_bytes, tvb(mo, mlen)) end
        for _, violation in ipairs(tlv.violations) do
            root:add_proto_expert_info(E.violation, violation.text)
        end
        root:add_proto_expert_info(E.torn, "torn message: " .. why)
        if band(rflags, 4) ~= 0 then
            root:add_proto_expert_info(E.cut_short, "the record holds " .. mlen .. " of the " ..
                int(tvb(36, 4):le_uint()) .. " bytes that arrived")
        end
        pinfo.cols.info = dir .. " #" .. seq .. " s" .. session .. " torn message: " .. why
        return
    end

    -- a message
    if session_start[session] == nil and not pinfo.visited then session_start[session] = t_ns end
    local start = session_start[session] or t_ns
    root:add(F.t, tvb(20, 8), (t_ns - start) / 1e9)

    local short = mlen < HEADER_SIZE
    local htvb, hat = tvb, mo
    if short then
        local bytes = mlen > 0 and tvb:bytes(mo, mlen) or ByteArray.new()
        bytes:set_size(HEADER_SIZE)
        htvb, hat = bytes:tvb("Short message, header padded with zeros"), 0
    end
    local h = message_header(htvb, root, hat)
    local is_error = band(h.flags, 0x20) ~= 0
    local mtype = band(h.flags, 0x0F)
    local is_reply = mtype == 1
    local kind = is_error and "error" or (is_reply and "reply" or "cmd")
    root:add(F.kind, short and tvb(mo, mlen) or tvb(mo + 8, 4), kind)
    if is_error then
        root:add_le(F.errno, short and tvb(mo, mlen) or tvb(mo + 12, 4), h.error)
    end

    -- violations, injection, register, step
    if #tlv.violations > 0 or band(rflags, 1) ~= 0 then
        root:add(F.violation, tvb(7, 1), true)
    end
    for _, violation in ipairs(tlv.violations) do
        root:add_proto_expert_info(E.violation, violation.text)
    end
    if band(rflags, 2) ~= 0 or tlv.inject then
        root:add(F.inject, tvb(7, 1), true)
        if tlv.inject then root:add(F.inject_event, tlv.inject) end
    end
    if tlv.register then root:add(F.register, tlv.register.range) end
    if tlv.step then root:add(F.step, tlv.step.range) end

    -- request <-> reply
    if request_seq then
        if not pinfo.visited then reply_frame_of_seq[request_seq] = pinfo.number end
        local request_frame = frame_of_seq[request_seq]
        if request_frame then
            root:add(F.response_to, tvb(28, 8), request_frame):set_generated()
        end
    elseif not is_reply then
        local reply_frame = reply_frame_of_seq[seq]
        if reply_frame then
            root:add(F.response_in, tvb(12, 8), reply_frame):set_generated()
        end
    end
    local latency_text = ""
    if tlv.latency then
        local ns = int(tlv.latency:le_uint64():tonumber())
        local secs = math.floor(ns / 1e9)
        root:add(F.time, tlv.latency, NSTime.new(int(secs), int(ns - secs * 1e9)))
        root:add(F.latency, tlv.latency, ns / 1e3)
        latency_text = string.format(" (+%.1f us)", ns / 1e3)
    end

    -- the body
    local info = {}
    local cut = band(rflags, 4) ~= 0
    local o, n = mo + HEADER_SIZE, mlen - HEADER_SIZE
    -- a whole record the export cut to fit a packet: decoded as the whole
    -- message (its fixed fields come first), its data as far as it is here
    local export_cut = not cut and not short and mlen < h.size and
        h.size == tvb(36, 4):le_uint()
    if export_cut then n = h.size - HEADER_SIZE end
    local ctx = { tvb = tvb, o = o, n = n, held = mlen - HEADER_SIZE, info = info,
                  is_reply = is_reply, seq = seq, request_seq = request_seq,
                  dma_layout = dma_layout }
    local decode_error = false
    for _, violation in ipairs(tlv.violations) do
        if violation.text:find("^decode_error:") then decode_error = true end
    end
    local raw_reason
    if short then
        raw_reason = "shorter than the 16-byte header"
    elseif h.size ~= mlen and not export_cut then
        raw_reason = cut and "only the start of the message is recorded"
            or "header size does not match the message length"
    elseif is_reply and is_error then
        if n > 0 then root:add(F.error_payload, range(ctx, 0, n)) end
    elseif mtype > 1 then
        raw_reason = "invalid message type"
    elseif (is_reply and REPLY_BODIES or COMMAND_BODIES)[h.command] == nil then
        raw_reason = "unknown command"
    elseif decode_error then
        raw_reason = "does not decode"
    elseif is_reply and n == 0 then
        -- a header-only reply: nothing more
    else
        local body = root:add(F.body, range(ctx, 0, n))
        local parse = (is_reply and REPLY_BODIES or COMMAND_BODIES)[h.command]
        if not parse(ctx, body) then
            raw_reason = "payload too short"
            body:add_proto_expert_info(E.malformed, command_name(h.command) ..
                " payload too short: " .. n .. " bytes")
        end
    end
    if raw_reason then
        -- the codec keeps such bytes raw: the filter's data is all of them
        if short then
            add_bytes({ tvb = tvb, o = mo, held = mlen }, root, F.data, 0, mlen)
        else
            add_bytes(ctx, root, F.data, 0, n)
        end
        if n > 0 then
            root:add(F.raw, range(ctx, 0, n)):append_text(" (" .. raw_reason .. ")")
        end
        if short then
            root:add_proto_expert_info(E.malformed, "a " .. mlen ..
                "-byte message, shorter than the 16-byte header")
        end
    end
    if export_cut then
        root:add(F.wire_length, tvb(36, 4)):append_text(
            " (the export cut the message to fit a packet: " .. mlen .. " bytes here)")
    end
    if cut then
        root:add_proto_expert_info(E.cut_short, "the record holds " .. mlen .. " of " ..
            int(tvb(36, 4):le_uint()) .. " bytes")
    end

    -- columns
    local words = { dir, "#" .. seq, command_name(h.command) }
    if kind ~= "cmd" then words[#words + 1] = kind end
    if is_error then words[#words + 1] = errno_name(h.error) end
    for _, word in ipairs(info) do words[#words + 1] = word end
    if tlv.register then words[#words + 1] = "[" .. tlv.register.text .. "]" end
    if raw_reason then words[#words + 1] = "(" .. raw_reason .. ")" end
    local text = table.concat(words, " ") .. latency_text
    if #tlv.violations > 0 then text = text .. " !!! " .. tlv.violations[1].text end
    pinfo.cols.info = text
    root:append_text(", " .. command_name(h.command) .. " " .. kind .. " id=" .. h.msg_id)
    if is_error then
        root:add_proto_expert_info(E.error_reply, command_name(h.command) .. " failed: " ..
            errno_name(h.error) .. " (" .. h.error .. ")")
    end
end
