"""Reference vfio-user peers: a device server and a QEMU-like realize client."""
