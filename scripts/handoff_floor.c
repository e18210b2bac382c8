/* The kernel's floor for a round-robin primary on this machine: what the
 * primary's per-connection syscalls cost with no cluster library around
 * them, measured as the primary's utime+stime (getrusage) over N loopback
 * connections. scripts/bench.py runs it next to the servers it compares.
 *
 *   handoff_floor N handoff   epoll_wait, accept4, sendmsg(SCM_RIGHTS) to a
 *                             worker, close at once (Node's handoff, and
 *                             syncluster's rr, which requeues from its copy
 *                             of the worker's pipe instead)
 *   handoff_floor N ack       the same, but the primary keeps its copy until
 *                             the worker acknowledges (4 bytes back on the
 *                             socketpair), as syncluster did before its pipe
 *
 * Four client processes connect, send a request, read the answer and close;
 * one worker process receives the fds, answers and closes them. Prints
 * "floor MODE: X us/conn (R conn/s, W wakes/conn)". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CLIENTS 4
#define HELD 4096
static const char REPLY[] = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

static double seconds(struct timeval t) { return (double)t.tv_sec + (double)t.tv_usec / 1e6; }
static void die(const char *what) { perror(what); exit(1); }

static void worker(int ch, int ack) {
    char b[64], cb[CMSG_SPACE(sizeof(int) * 64)];
    for (;;) {
        struct iovec io = {b, sizeof b};
        struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cb, .msg_controllen = sizeof cb};
        if (recvmsg(ch, &m, MSG_CMSG_CLOEXEC) <= 0) _exit(0);
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            int *fds = (int *)CMSG_DATA(c), n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            for (int i = 0; i < n; i++) {
                /* As syncluster's worker: acknowledge, then serve. */
                if (ack && write(ch, "ack!", 4) != 4) _exit(1);
                char req[512];
                if (read(fds[i], req, sizeof req) > 0 && write(fds[i], REPLY, sizeof REPLY - 1) < 0) {}
                close(fds[i]);
            }
        }
    }
}

static void client(struct sockaddr_in a, int n) {
    for (int i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        char b[256];
        if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a)) die("connect");
        if (write(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27) != 27) die("write");
        while (read(c, b, sizeof b) > 0) {}
        close(c);
    }
    _exit(0);
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[2], "handoff") && strcmp(argv[2], "ack"))) {
        fprintf(stderr, "usage: handoff_floor N handoff|ack\n");
        return 2;
    }
    int n = atoi(argv[1]) / CLIENTS * CLIENTS, ack = !strcmp(argv[2], "ack"), one = 1;
    if (n <= 0) { fprintf(stderr, "handoff_floor: bad N\n"); return 2; }
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0), sp[2];
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t alen = sizeof a;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (l < 0 || setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 511) ||
        getsockname(l, (struct sockaddr *)&a, &alen))
        die("listen");
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp)) die("socketpair");
    if (fork() == 0) { close(sp[0]); close(l); worker(sp[1], ack); }
    close(sp[1]);
    for (int k = 0; k < CLIENTS; k++)
        if (fork() == 0) { close(sp[0]); close(l); client(a, n / CLIENTS); }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event le = {.events = EPOLLIN, .data.u32 = 0}, ce = {.events = EPOLLIN, .data.u32 = 1};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, l, &le) || fcntl(sp[0], F_SETFL, O_NONBLOCK) ||
        (ack && epoll_ctl(ep, EPOLL_CTL_ADD, sp[0], &ce)))
        die("epoll");
    static int held[HELD];
    int nheld = 0, first = 0, done = 0;
    long wakes = 0;
    struct rusage r0, r1;
    struct timespec t0, t1;
    getrusage(RUSAGE_SELF, &r0);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (done < n) {
        struct epoll_event evs[8];
        int k = epoll_wait(ep, evs, 8, 5000);
        if (k <= 0) { fprintf(stderr, "handoff_floor: stalled at %d of %d\n", done, n); return 1; }
        wakes++;
        for (int e = 0; e < k; e++) {
            if (evs[e].data.u32 == 1) { /* acknowledgements: close the copies */
                char b[4 * 64];
                ssize_t r;
                while ((r = read(sp[0], b, sizeof b)) > 0)
                    for (int q = 0; q < r / 4 && nheld > 0; q++, nheld--, done++)
                        close(held[first++ % HELD]);
                continue;
            }
            for (;;) {
                int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0) break;
                char byte = 0, cb[CMSG_SPACE(sizeof(int))];
                struct iovec io = {&byte, 1};
                struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = cb, .msg_controllen = sizeof cb};
                struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
                cm->cmsg_level = SOL_SOCKET;
                cm->cmsg_type = SCM_RIGHTS;
                cm->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(cm), &c, sizeof c);
                if (sendmsg(sp[0], &m, 0) != 1) die("sendmsg");
                if (ack && nheld < HELD) held[(first + nheld++) % HELD] = c;
                else { close(c); done++; }
            }
        }
    }
    getrusage(RUSAGE_SELF, &r1);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double cpu = seconds(r1.ru_utime) - seconds(r0.ru_utime) + seconds(r1.ru_stime) - seconds(r0.ru_stime);
    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("floor %s: %.1f us/conn (%.0f conn/s, %.2f wakes/conn)\n", argv[2], cpu * 1e6 / n, n / wall,
           (double)wakes / n);
    close(sp[0]);
    while (wait(NULL) > 0) {}
    return 0;
}
