/* The speed limit for scripts/bench.py: a plain prefork hello-world server,
 * no cluster protocol, no primary in the data path. The parent listens on
 * 127.0.0.1:PORT, forks WORKERS blocking workers and waits for SIGTERM/SIGINT.
 *   shared     every worker accept4()s on the one listening socket;
 *   reuseport  each worker has its own SO_REUSEPORT socket on that port.
 * Same response bytes as examples/common/http.rs; request bodies are ignored.
 * Usage: prefork WORKERS PORT shared|reuseport [deferred]  (PORT 0: any free
 * one; deferred: TCP_DEFER_ACCEPT, as hello --deferred and nginx's
 * `listen ... deferred`) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define HEAD "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
static const char KEEP[] = HEAD "Connection: keep-alive\r\n\r\nhello world\n";
static const char CLOSE[] = HEAD "Connection: close\r\n\r\nhello world\n";
static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }
static void die(const char *what) { perror(what); exit(1); }

static int deferred;

static int listener(int reuseport, int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1, secs = 5;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) ||
        (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one)) ||
        (deferred && setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &secs, sizeof secs)) ||
        bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 511))
        die("listen");
    return fd;
}

/* Answers the requests of one connection until the client closes, asks to
 * close, or the worker is told to stop between two requests. */
static void serve(int c) {
    char buf[8192];
    size_t len = 0;
    for (;;) {
        char *end;
        while (!(buf[len] = 0, end = strstr(buf, "\r\n\r\n"))) {
            if (stop || len == sizeof buf - 1) return;
            ssize_t n = read(c, buf + len, sizeof buf - 1 - len);
            if (n <= 0) return;
            len += (size_t)n;
        }
        *end = 0;
        int close_it = strcasestr(buf, "\nconnection: close") != NULL ||
            (strstr(buf, " HTTP/1.0\r\n") && !strcasestr(buf, "\nconnection: keep-alive"));
        const char *r = close_it ? CLOSE : KEEP;
        size_t rlen = close_it ? sizeof CLOSE - 1 : sizeof KEEP - 1;
        if (write(c, r, rlen) != (ssize_t)rlen) return;
        len -= (size_t)(end + 4 - buf); /* keep a pipelined next request */
        if (close_it) {
            /* Unread bytes would turn close() into an RST: drain them
             * first. With none (the usual case) close at once, as a plain
             * prefork server does; waiting for the client's FIN would cost
             * this blocking worker a round trip per connection. */
            if (len > 0) {
                shutdown(c, SHUT_WR);
                while (read(c, buf, sizeof buf) > 0) {}
            }
            return;
        }
        memmove(buf, end + 4, len);
    }
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5 || (strcmp(argv[3], "shared") && strcmp(argv[3], "reuseport")) ||
        (argc == 5 && strcmp(argv[4], "deferred"))) {
        fprintf(stderr, "usage: prefork WORKERS PORT shared|reuseport [deferred]\n");
        return 2;
    }
    deferred = argc == 5;
    int workers = atoi(argv[1]), reuseport = !strcmp(argv[3], "reuseport");
    if (workers < 1 || workers > 1024) { fprintf(stderr, "prefork: bad WORKERS\n"); return 2; }
    /* One slot per worker for its count, on its own cache line. */
    long *served = mmap(NULL, (size_t)workers * 64, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (served == MAP_FAILED) die("mmap");
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigprocmask(SIG_BLOCK, &set, NULL); /* the parent sigwait()s for them */
    signal(SIGPIPE, SIG_IGN);
    /* Every socket is listening before the first fork: no refused window. */
    int fds[1024], port = atoi(argv[2]);
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    for (int i = 0; i < (reuseport ? workers : 1); i++) {
        fds[i] = listener(reuseport, port);
        if (getsockname(fds[i], (struct sockaddr *)&a, &alen)) die("getsockname");
        port = ntohs(a.sin_port);
    }
    pid_t pids[1024];
    for (int i = 0; i < workers; i++) {
        if ((pids[i] = fork()) < 0) die("fork");
        if (pids[i] > 0) continue;
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        /* No SA_RESTART: SIGTERM interrupts a blocking accept4 or read. */
        struct sigaction sa = {.sa_handler = on_term};
        sigaction(SIGTERM, &sa, NULL);
        signal(SIGINT, SIG_IGN); /* Ctrl-C reaches the parent, which decides */
        sigprocmask(SIG_UNBLOCK, &set, NULL);
        for (int j = 0; reuseport && j < workers; j++)
            if (j != i) close(fds[j]); /* a dead worker's queue must not linger */
        int fd = fds[reuseport ? i : 0];
        while (!stop) {
            int c = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) continue; /* EINTR, or a connection reset before accept */
            served[i * 8]++;
            serve(c);
            close(c);
        }
        _exit(0);
    }
    for (int i = 0; i < (reuseport ? workers : 1); i++) close(fds[i]);
    printf("listening on http://127.0.0.1:%d (%d workers, c prefork %s%s)\n", port, workers, argv[3],
           deferred ? ", deferred" : "");
    fflush(stdout);
    int sig;
    sigwait(&set, &sig);
    /* Again every 10 ms: a SIGTERM just before accept4 blocks is not seen. */
    int left = workers;
    for (int tries = 0; left > 0; tries++) {
        for (int i = 0; i < workers; i++)
            if (pids[i] > 0) kill(pids[i], tries < 500 ? SIGTERM : SIGKILL);
        usleep(10000);
        for (int i = 0; i < workers; i++)
            if (pids[i] > 0 && waitpid(pids[i], NULL, WNOHANG) == pids[i]) pids[i] = 0, left--;
    }
    printf("served {");
    for (int i = 0; i < workers; i++) printf("%s\"%d\":%ld", i ? "," : "", i + 1, served[i * 8]);
    printf("}\n");
    return 0;
}
