/*
 * vu_echo: a minimal, fast vfio-user server for the proxy benchmarks.
 *
 *   vu_echo --socket SOCK
 *
 * Serves one client at a time. Answers VERSION with a short JSON reply,
 * REGION_READ with `count` data bytes, REGION_WRITE with the 32-byte reply,
 * and every other command with a header-only reply; no_reply commands and
 * replies get nothing. Fds that arrive are closed.
 */
#include "vu_common.h"

#include <getopt.h>
#include <signal.h>

#define VU_EINVAL 22

static const char version_json[] =
    "{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576}}";

static char *body;
static char *data;

/* Read one message into hdr/body: 1 done, 0 closed cleanly, -1 failure. */
static int receive(int fd, struct vu_header *hdr, size_t *body_len)
{
    union {
        char buf[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    size_t got = 0;
    while (got < VU_HEADER_SIZE) {
        struct iovec iov = {(char *)hdr + got, VU_HEADER_SIZE - got};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        ssize_t k = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return (k == 0 && got == 0) ? 0 : -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++)
                close(((int *)CMSG_DATA(c))[i]);
        }
        got += (size_t)k;
    }
    *body_len = vu_body_length(hdr->size);
    if (*body_len && vu_recv_exact(fd, body, *body_len) != 1)
        return -1;
    return 1;
}

static int answer(int fd, const struct vu_header *cmd, size_t body_len)
{
    struct vu_header reply = {cmd->msg_id, cmd->command, VU_HEADER_SIZE, VU_TYPE_REPLY, 0};
    struct vu_region_access access;
    struct {
        uint16_t major, minor;
    } version = {0, 0};
    struct iovec iov[3] = {{&reply, VU_HEADER_SIZE}};
    int iovcnt = 1;

    if (cmd->command == VU_VERSION) {
        iov[1] = (struct iovec){&version, sizeof(version)};
        iov[2] = (struct iovec){(void *)version_json, sizeof(version_json)};
        iovcnt = 3;
    } else if (cmd->command == VU_REGION_READ || cmd->command == VU_REGION_WRITE) {
        if (body_len < sizeof(access)) {
            reply.flags |= 0x20;
            reply.error = VU_EINVAL;
        } else {
            memcpy(&access, body, sizeof(access));
            int read = cmd->command == VU_REGION_READ;
            if (read && access.count > VU_MAX_MESSAGE - 32) {
                reply.flags |= 0x20;
                reply.error = VU_EINVAL;
            } else {
                iov[1] = (struct iovec){&access, sizeof(access)};
                iov[2] = (struct iovec){data, read ? access.count : 0};
                iovcnt = read ? 3 : 2;
            }
        }
    }
    for (int i = 1; i < iovcnt; i++)
        reply.size += (uint32_t)iov[i].iov_len;
    return vu_send_iov(fd, iov, iovcnt, NULL, 0);
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "s:", options, NULL)) != -1) {
        if (opt == 's')
            path = optarg;
        else
            return 2;
    }
    if (!path) {
        fprintf(stderr, "usage: vu_echo --socket SOCK\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    body = malloc(VU_MAX_MESSAGE);
    data = malloc(VU_MAX_MESSAGE);
    if (!body || !data)
        vu_die("malloc");
    for (size_t i = 0; i < VU_MAX_MESSAGE; i++)
        data[i] = (char)(i * 7 + 1);
    int listener = vu_listen(path);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EINTR)
                continue;
            vu_die("accept");
        }
        struct vu_header hdr;
        size_t body_len;
        while (receive(client, &hdr, &body_len) == 1) {
            if ((hdr.flags & 0xf) != 0 || (hdr.flags & VU_FLAG_NO_REPLY))
                continue;
            if (answer(client, &hdr, body_len) < 0)
                break;
        }
        close(client);
    }
}
