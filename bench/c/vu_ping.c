/*
 * vu_ping: the C client of the proxy benchmarks.
 *
 *   vu_ping --socket SOCK [--mode lat|read|write] [--count N] [--warmup W]
 *           [--size BYTES] [--samples FILE] [--pause-at K1,K2,...]
 *
 * Connects, sends VERSION, then N commands one at a time (each waits for its
 * reply, as QEMU's vCPU does):
 *   lat    REGION_READ of 4 bytes at offset 0 of region 7 (config space);
 *   read   REGION_READ of --size bytes (default 1 MiB) of region 0;
 *   write  REGION_WRITE of --size bytes to region 0.
 * The first W commands are warm-up and not measured. Prints one JSON line:
 * round trip p50/p99/mean/min in ns, elapsed time, MiB/s of payload, and
 * `messages`, every message that crossed the socket (both directions,
 * VERSION and warm-up included). --samples writes the measured round trips
 * as little-endian u64 ns. --pause-at K,...: after K messages, print
 * "pause K" and wait for a line on stdin (the benchmark reads the relay's
 * memory there).
 */
#include "vu_common.h"

#include <getopt.h>
#include <signal.h>

static const char version_json[] =
    "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576}}";

static char *buf;
static char *payload;
static uint16_t next_id;

static void round_trip(int fd, uint16_t command, struct iovec *body, int nbody, size_t expect)
{
    struct vu_header hdr = {next_id++, command, VU_HEADER_SIZE, 0, 0};
    struct iovec iov[4] = {{&hdr, VU_HEADER_SIZE}};
    for (int i = 0; i < nbody; i++) {
        iov[1 + i] = body[i];
        hdr.size += (uint32_t)body[i].iov_len;
    }
    if (vu_send_iov(fd, iov, 1 + nbody, NULL, 0) < 0)
        vu_die("vu_ping: send");
    struct vu_header reply;
    if (vu_recv_exact(fd, &reply, VU_HEADER_SIZE) != 1) {
        fprintf(stderr, "vu_ping: connection closed\n");
        exit(1);
    }
    size_t n = vu_body_length(reply.size);
    if (n && vu_recv_exact(fd, buf, n) != 1) {
        fprintf(stderr, "vu_ping: connection closed mid-message\n");
        exit(1);
    }
    if (reply.msg_id != hdr.msg_id || (reply.flags & 0xf) != VU_TYPE_REPLY ||
        (reply.flags & 0x20) || (expect && reply.size != expect)) {
        fprintf(stderr, "vu_ping: bad reply id %u flags %#x error %u size %u\n", reply.msg_id,
                reply.flags, reply.error, reply.size);
        exit(1);
    }
}

static int compare(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static uint64_t rank(const uint64_t *sorted, long n, double p)
{
    long i = (long)(p * (double)n + 0.999999999) - 1;
    return sorted[i < 0 ? 0 : i];
}

int main(int argc, char **argv)
{
    const char *path = NULL, *mode = "lat", *samples_path = NULL, *pause_at = NULL;
    long count = 10000, warmup = 100;
    size_t size = 1024 * 1024;
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},  {"mode", required_argument, NULL, 'm'},
        {"count", required_argument, NULL, 'n'},   {"warmup", required_argument, NULL, 'w'},
        {"size", required_argument, NULL, 'z'},    {"samples", required_argument, NULL, 'o'},
        {"pause-at", required_argument, NULL, 'p'}, {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "s:m:n:w:z:o:p:", options, NULL)) != -1) {
        switch (opt) {
        case 's': path = optarg; break;
        case 'm': mode = optarg; break;
        case 'n': count = atol(optarg); break;
        case 'w': warmup = atol(optarg); break;
        case 'z': size = (size_t)atol(optarg); break;
        case 'o': samples_path = optarg; break;
        case 'p': pause_at = optarg; break;
        default: return 2;
        }
    }
    int lat = !strcmp(mode, "lat"), rd = !strcmp(mode, "read"), wr = !strcmp(mode, "write");
    if (!path || !(lat || rd || wr) || count < 1 || warmup < 0 || size < 1 ||
        size > VU_MAX_MESSAGE - 32) {
        fprintf(stderr, "usage: vu_ping --socket SOCK [--mode lat|read|write] [--count N] "
                        "[--warmup W] [--size BYTES] [--samples FILE] [--pause-at K,...]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    buf = malloc(VU_MAX_MESSAGE);
    payload = malloc(VU_MAX_MESSAGE);
    uint64_t *samples = malloc(sizeof(uint64_t) * (size_t)count);
    if (!buf || !payload || !samples)
        vu_die("malloc");
    memset(payload, 0x5a, VU_MAX_MESSAGE);

    int fd = vu_connect(path);
    if (fd < 0)
        vu_die("vu_ping: connect");

    struct {
        uint16_t major, minor;
    } version = {0, 0};
    struct iovec vbody[2] = {{&version, sizeof(version)},
                             {(void *)version_json, sizeof(version_json)}};
    round_trip(fd, VU_VERSION, vbody, 2, 0);
    long messages = 2;

    struct vu_region_access access = {0, lat ? 7 : 0, lat ? 4 : (uint32_t)size};
    uint16_t command = wr ? VU_REGION_WRITE : VU_REGION_READ;
    struct iovec body[2] = {{&access, sizeof(access)}, {payload, wr ? size : 0}};
    int nbody = wr ? 2 : 1;
    size_t expect = 32 + (rd || lat ? access.count : 0);
    const char *next_pause = pause_at;

    uint64_t start = 0;
    for (long i = -warmup; i < count; i++) {
        if (i == 0)
            start = vu_now_ns();
        uint64_t t0 = vu_now_ns();
        round_trip(fd, command, body, nbody, expect);
        uint64_t t1 = vu_now_ns();
        if (i >= 0)
            samples[i] = t1 - t0;
        messages += 2;
        if (next_pause && *next_pause && messages >= atol(next_pause)) {
            printf("pause %ld\n", messages);
            fflush(stdout);
            char line[64];
            if (!fgets(line, sizeof(line), stdin))
                return 1;
            next_pause = strchr(next_pause, ',');
            if (next_pause)
                next_pause++;
        }
    }
    uint64_t elapsed = vu_now_ns() - start;
    close(fd);

    if (samples_path) {
        FILE *out = fopen(samples_path, "wb");
        if (!out || fwrite(samples, sizeof(uint64_t), (size_t)count, out) != (size_t)count ||
            fclose(out))
            vu_die(samples_path);
    }
    double sum = 0;
    for (long i = 0; i < count; i++)
        sum += (double)samples[i];
    qsort(samples, (size_t)count, sizeof(uint64_t), compare);
    double bytes = lat ? 4.0 * (double)count : (double)size * (double)count;
    printf("{\"mode\": \"%s\", \"count\": %ld, \"messages\": %ld, \"size\": %zu, "
           "\"min_ns\": %lu, \"p50_ns\": %lu, \"p99_ns\": %lu, \"mean_ns\": %.0f, "
           "\"elapsed_ns\": %lu, \"mib_s\": %.1f}\n",
           mode, count, messages, lat ? (size_t)4 : size, (unsigned long)samples[0],
           (unsigned long)rank(samples, count, 0.5), (unsigned long)rank(samples, count, 0.99),
           sum / (double)count, (unsigned long)elapsed,
           bytes / (1024.0 * 1024.0) / ((double)elapsed / 1e9));
    return 0;
}
