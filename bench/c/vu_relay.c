/*
 * vu_relay: the C baseline of the proxy benchmarks, a minimal vfio-user relay.
 *
 *   vu_relay --listen CLIENT_SOCK --server SERVER_SOCK
 *
 * Serves one client at a time (so its CPU time stays in this process): accept
 * a client, connect to the server, poll both sockets; for each message,
 * recvmsg the 16-byte header with an ancillary buffer for 253 fds
 * (MSG_CMSG_CLOEXEC, MSG_CTRUNC is fatal), recv exactly the body, forward
 * header + body + fds in one sendmsg, close its copies of the fds. A size that
 * cannot be framed is forwarded as the header alone (protocol.md §6, pitfall
 * 20). Reads block once poll reports a message: enough for request/reply
 * traffic, which is what it measures.
 */
#include "vu_common.h"

#include <getopt.h>
#include <poll.h>
#include <signal.h>

static char *body;

/* Forward one message from src to dst: 1 done, 0 src closed cleanly, -1 failure. */
static int forward(int src, int dst)
{
    struct vu_header hdr;
    union {
        char buf[CMSG_SPACE(VU_MAX_FDS * sizeof(int))];
        struct cmsghdr align;
    } control;
    int fds[VU_MAX_FDS];
    int nfds = 0;
    size_t got = 0;
    int result = -1;

    while (got < VU_HEADER_SIZE) {
        struct iovec iov = {(char *)&hdr + got, VU_HEADER_SIZE - got};
        struct msghdr msg = {0};
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof(control.buf);
        ssize_t k = recvmsg(src, &msg, MSG_CMSG_CLOEXEC);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0) {
            result = (k == 0 && got == 0) ? 0 : -1;
            goto out;
        }
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            if (n > VU_MAX_FDS - nfds)
                n = VU_MAX_FDS - nfds;
            memcpy(fds + nfds, CMSG_DATA(c), (size_t)n * sizeof(int));
            nfds += n;
        }
        if (msg.msg_flags & MSG_CTRUNC) {
            fprintf(stderr, "vu_relay: fds truncated\n");
            goto out;
        }
        got += (size_t)k;
    }
    size_t n = vu_body_length(hdr.size);
    if (n && vu_recv_exact(src, body, n) != 1)
        goto out;
    struct iovec iov[2] = {{&hdr, VU_HEADER_SIZE}, {body, n}};
    if (vu_send_iov(dst, iov, n ? 2 : 1, fds, nfds) < 0)
        goto out;
    result = 1;
out:
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    return result;
}

static void relay(int client, const char *server_path)
{
    int server = vu_connect(server_path);
    if (server < 0) {
        perror("vu_relay: connect to the server");
        return;
    }
    struct pollfd p[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[0].revents && forward(client, server) <= 0)
            break;
        if (p[1].revents && forward(server, client) <= 0)
            break;
    }
    close(server);
}

int main(int argc, char **argv)
{
    const char *listen_path = NULL, *server_path = NULL;
    static const struct option options[] = {
        {"listen", required_argument, NULL, 'l'},
        {"server", required_argument, NULL, 's'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    while ((opt = getopt_long(argc, argv, "l:s:", options, NULL)) != -1) {
        if (opt == 'l')
            listen_path = optarg;
        else if (opt == 's')
            server_path = optarg;
        else
            return 2;
    }
    if (!listen_path || !server_path) {
        fprintf(stderr, "usage: vu_relay --listen CLIENT_SOCK --server SERVER_SOCK\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    body = malloc(VU_MAX_MESSAGE);
    if (!body)
        vu_die("malloc");
    int listener = vu_listen(listen_path);
    for (;;) {
        int client = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (client < 0) {
            if (errno == EINTR)
                continue;
            vu_die("accept");
        }
        relay(client, server_path);
        close(client);
    }
}
