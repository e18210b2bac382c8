/* A plain hello-world worker that speaks systemd's two protocols itself,
 * with no library: socket activation (it serves on the socket passed as
 * fd 3) and readiness (READY=1 to $NOTIFY_SOCKET). Runs under systemd, under
 * `systemd-socket-activate -l 127.0.0.1:8080 ./hello`, or under
 * `syncluster --listen 127.0.0.1:8080 -- ./hello`. One connection at a time, one request per
 * connection (as unicorn does): run several processes for concurrency.
 * On SIGTERM or SIGINT it finishes the request it holds and exits 0.
 * Its answer names it: $SYNCLUSTER_WORKER_ID if set, else its pid.
 *   cc -std=c99 -O2 -Wall -Wextra -o hello examples/workers/hello.c */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define LISTEN_FDS_START 3
#define MAX_FDS 64

static volatile sig_atomic_t stop;
static void on_stop(int sig) { (void)sig; stop = 1; }

/* sd_listen_fds(): how many fds, from 3, the service manager passed to this
 * very process (0: none), and their names from LISTEN_FDNAMES ("a:b:..."),
 * "unknown" where unnamed. The fds become close-on-exec and the three
 * variables are unset, so no child of ours mistakes them for its own. */
static int listen_fds(const char *names[MAX_FDS]) {
    static char buf[4096];
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    const char *fdnames = getenv("LISTEN_FDNAMES");
    char *end;
    long n = 0;
    if (pid && fds && strtol(pid, &end, 10) == (long)getpid() && !*end && *pid) {
        n = strtol(fds, &end, 10);
        if (*end || !*fds || n < 0 || n > MAX_FDS) n = 0;
    }
    snprintf(buf, sizeof buf, "%s", fdnames ? fdnames : "");
    char *next = buf;
    for (long i = 0; i < n; i++) {
        names[i] = strsep(&next, ":"); /* NULL once the names run out */
        if (!names[i] || !*names[i]) names[i] = "unknown";
        fcntl(LISTEN_FDS_START + (int)i, F_SETFD, FD_CLOEXEC);
    }
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    return (int)n;
}

/* sd_notify(): one datagram to the AF_UNIX socket named by NOTIFY_SOCKET, a
 * path or, with a leading '@', an abstract name. 0: sent, or nobody asked. */
static int notify(const char *state) {
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t len = path ? strlen(path) : 0;
    if (!len) return 0;
    if ((path[0] != '/' && path[0] != '@') || len >= sizeof a.sun_path) return -EINVAL;
    memcpy(a.sun_path, path, len);
    if (path[0] == '@') a.sun_path[0] = '\0';
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    ssize_t r = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&a,
                       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len));
    int err = r < 0 ? -errno : 0;
    close(fd);
    return err;
}

/* Reads one request head, answers it and closes. The socket timeouts bound
 * a slow client; stop signals are blocked meanwhile. */
static void serve(int c, const char *body) {
    char buf[8192], head[256];
    size_t len = 0;
    buf[0] = '\0';
    while (!strstr(buf, "\r\n\r\n") && !strstr(buf, "\n\n")) {
        ssize_t n = read(c, buf + len, sizeof buf - 1 - len);
        if (n <= 0 || (len += (size_t)n) == sizeof buf - 1) return;
        buf[len] = '\0';
    }
    int hl = snprintf(head, sizeof head, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                      "Content-Length: %zu\r\nConnection: close\r\n\r\n", strlen(body));
    if (write(c, head, (size_t)hl) != hl || write(c, body, strlen(body)) < 0) return;
    shutdown(c, SHUT_WR); /* then wait for the client's EOF: closing on unread */
    while (read(c, buf, sizeof buf) > 0) {} /* input would send a RST */
}

int main(void) {
    const char *names[MAX_FDS];
    int n = listen_fds(names);
    int listening = 0;
    socklen_t sl = sizeof listening;
    if (n < 1 || getsockopt(LISTEN_FDS_START, SOL_SOCKET, SO_ACCEPTCONN, &listening, &sl) || !listening) {
        fprintf(stderr, "hello: no listening socket passed (LISTEN_FDS, LISTEN_PID); run it under "
                        "systemd-socket-activate -l 127.0.0.1:8080, a .socket unit or syncluster\n");
        return 2;
    }
    const char *id = getenv("SYNCLUSTER_WORKER_ID");
    char body[128];
    if (id) snprintf(body, sizeof body, "hello from worker %s\n", id);
    else snprintf(body, sizeof body, "hello from pid %ld\n", (long)getpid());
    /* Stop signals are blocked except inside ppoll, which unblocks them
     * atomically: no signal can slip in between a check of `stop` and a
     * blocking call, and none interrupts a connection being served. */
    sigset_t stops, waiting;
    sigemptyset(&stops);
    sigaddset(&stops, SIGTERM);
    sigaddset(&stops, SIGINT);
    sigprocmask(SIG_BLOCK, &stops, &waiting);
    sigdelset(&waiting, SIGTERM);
    sigdelset(&waiting, SIGINT);
    struct sigaction sa = {.sa_handler = on_stop};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* Non-blocking, so that a connection another worker took first does not
     * leave this one blocked in accept4 (libuv does the same to a passed fd). */
    fcntl(LISTEN_FDS_START, F_SETFL, fcntl(LISTEN_FDS_START, F_GETFL) | O_NONBLOCK);
    int err = notify("READY=1");
    if (err) fprintf(stderr, "hello: READY=1 not sent: %s\n", strerror(-err));
    fprintf(stderr, "hello: pid %ld serving on fd %d (%s)\n", (long)getpid(), LISTEN_FDS_START, names[0]);
    struct timeval tv = {.tv_sec = 10};
    struct pollfd p = {.fd = LISTEN_FDS_START, .events = POLLIN};
    while (!stop) {
        if (ppoll(&p, 1, NULL, &waiting) < 0) continue; /* EINTR: on_stop ran */
        int c = accept4(LISTEN_FDS_START, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                usleep(100000); /* out of resources: do not spin */
            continue;           /* EAGAIN (another worker took it), ECONNABORTED, ... */
        }
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        serve(c, body);
        close(c);
    }
    return 0;
}
