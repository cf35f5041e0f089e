/* Shared helpers of the vfio-user benchmark programs (vu_relay, vu_echo, vu_ping). */
#ifndef VU_COMMON_H
#define VU_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define VU_HEADER_SIZE 16
#define VU_MAX_FDS 253
/* the largest message QEMU and libvfio-user accept by default: 1 MiB of data + 32 */
#define VU_MAX_MESSAGE (1024 * 1024 + 32)

#define VU_VERSION 1
#define VU_REGION_READ 9
#define VU_REGION_WRITE 10

#define VU_TYPE_REPLY 0x1
#define VU_FLAG_NO_REPLY 0x10

struct vu_header {
    uint16_t msg_id;
    uint16_t command;
    uint32_t size;
    uint32_t flags;
    uint32_t error;
};

struct vu_region_access {
    uint64_t offset;
    uint32_t region;
    uint32_t count;
};

static inline void vu_die(const char *what)
{
    perror(what);
    exit(1);
}

static inline uint64_t vu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Body bytes a receiver reads after a header announcing `size` (protocol.md §6 pitfall 20). */
static inline size_t vu_body_length(uint32_t size)
{
    if (size < VU_HEADER_SIZE || size > VU_MAX_MESSAGE)
        return 0;
    return size - VU_HEADER_SIZE;
}

/* Receive exactly n bytes without an ancillary buffer; 0 on EOF before the first byte. */
static inline int vu_recv_exact(int fd, void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t k = recv(fd, (char *)buf + got, n - got, 0);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            return got ? -1 : 0;
        got += (size_t)k;
    }
    return 1;
}

/* Send everything of iov (modified in place); fds go with the first sendmsg only. */
static inline int vu_send_iov(int fd, struct iovec *iov, int iovcnt, const int *fds, int nfds)
{
    union {
        char buf[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = (size_t)iovcnt;
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
        memcpy(CMSG_DATA(cmsg), fds, (size_t)nfds * sizeof(int));
    }
    for (;;) {
        ssize_t k = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
        size_t left = (size_t)k;
        while (msg.msg_iovlen && left >= msg.msg_iov->iov_len) {
            left -= msg.msg_iov->iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (!msg.msg_iovlen)
            return 0;
        msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + left;
        msg.msg_iov->iov_len -= left;
    }
}

static inline void vu_sockaddr(struct sockaddr_un *addr, const char *path)
{
    memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr->sun_path)) {
        fprintf(stderr, "socket path too long: %s\n", path);
        exit(2);
    }
    strcpy(addr->sun_path, path);
}

static inline int vu_listen(const char *path)
{
    struct sockaddr_un addr;
    vu_sockaddr(&addr, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        vu_die("socket");
    unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        vu_die("bind");
    if (listen(fd, 16) < 0)
        vu_die("listen");
    return fd;
}

static inline int vu_connect(const char *path)
{
    struct sockaddr_un addr;
    vu_sockaddr(&addr, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        vu_die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

#endif
