/* The C API from C: run by tests/capi.rs (also under valgrind).
 *
 *   capi_test basics   errors, settings, forks of /bin/sh, exit statuses
 *   capi_test fds      messages with fds both ways; fd ownership; the fd +
 *                      non-blocking step on both sides; a Unix socket
 *                      listener; graceful disconnect
 *   capi_test supervisor  sc_supervisor_run: what the callback may and may
 *                      not do, messages through sc_supervisor_primary, a stop
 *   capi_test cluster  2 workers on 127.0.0.1:0 (round robin). Worker 1
 *                      listens and never accepts; the primary kills it as
 *                      soon as a connection is in flight to it, and worker 2
 *                      must serve that connection. Lines on stdout:
 *                      "listening on http://127.0.0.1:PORT",
 *                      "killing 1 with N in flight",
 *                      "exit ID code C signal S after A", "message ID TEXT",
 *                      "done". SIGTERM: a graceful stop.
 *
 * Every check prints what failed and the library's last error message,
 * and exits 1. The same program is primary and worker (sc_role); its
 * workers exec argv[0] resolved, so that valgrind's --trace-children
 * follows them. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "syncluster.h"

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: %s failed [pid %d]; last error: %s\n", __FILE__,     \
                    __LINE__, #cond, (int)getpid(), sc_last_error_message());            \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

/* The call returns the errno: checked with its message. */
#define CHECK_ERR(call, err)                                                             \
    do {                                                                                 \
        int r_ = (call);                                                                 \
        if (r_ != (err)) {                                                               \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d; last error: %s\n", \
                    __FILE__, __LINE__, #call, r_, sc_strerror(r_), (err),               \
                    sc_last_error_message());                                            \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

static char self[PATH_MAX];

static int cloexec(int fd) {
    int flags = fcntl(fd, F_GETFD);
    return flags != -1 && (flags & FD_CLOEXEC);
}

static int is_open(int fd) { return fcntl(fd, F_GETFD) != -1; }

static void read_text(int fd, const char *want) {
    char buf[64];
    size_t len = 0;
    ssize_t n;
    while ((n = read(fd, buf + len, sizeof buf - 1 - len)) > 0) len += (size_t)n;
    buf[len] = 0;
    if (strcmp(buf, want)) {
        fprintf(stderr, "read %s, expected %s\n", buf, want);
        exit(1);
    }
}

/* A pipe whose read end holds `text` (the write end is closed). */
static int pipe_with(const char *text) {
    int p[2];
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK(write(p[1], text, strlen(text)) == (ssize_t)strlen(text));
    close(p[1]);
    return p[0];
}

/* Waits (bounded) for the next event of one of `kinds` (0-terminated),
 * skipping others. */
static void expect(sc_primary *p, sc_event *ev, const int *kinds) {
    for (int turns = 0; turns < 1000; turns++) {
        int r = sc_primary_next_event(p, 10000, ev);
        CHECK(r == 1);
        for (const int *k = kinds; *k; k++)
            if (ev->kind == *k) return;
    }
    CHECK(!"no such event");
}

/* ------------------------------------------------------------- basics */

static void basics(void) {
    sc_primary *p = NULL, *p2;
    sc_worker *w = NULL;
    sc_event ev = SC_EVENT_INIT;
    sc_worker_info info = SC_WORKER_INFO_INIT;
    uint32_t id = 0, ids[4];

    CHECK(syncluster_version() == SYNCLUSTER_VERSION);
    CHECK(!strcmp(syncluster_version_string(), SYNCLUSTER_VERSION_STRING));
    CHECK(!strcmp(sc_strerror(-EINVAL), strerror(EINVAL)));
    CHECK(sc_strerror(-EINVAL) == sc_strerror(EINVAL));
    CHECK(!strcmp(sc_last_error_message(), ""));

    /* NULL pointers and bad lengths: -EINVAL, never a crash. */
    CHECK_ERR(sc_role(NULL, &w), -EINVAL);
    CHECK(strstr(sc_last_error_message(), "sc_role"));
    CHECK_ERR(sc_primary_fork(NULL, &id), -EINVAL);
    CHECK(strstr(sc_last_error_message(), "sc_primary is NULL"));
    CHECK_ERR(sc_worker_send(NULL, "x", 1, NULL, 0), -EINVAL);
    {
        int fd = -1;
        CHECK_ERR(sc_listener_accept(NULL, &fd), -EINVAL);
        CHECK(fd == -1);
    }
    CHECK_ERR(sc_primary_next_event(NULL, 0, &ev), -EINVAL);
    CHECK_ERR(sc_worker_is_disconnecting(NULL), -EINVAL);
    CHECK(sc_worker_id(NULL) == 0);
    CHECK(sc_supervisor_primary(NULL) == NULL);
    CHECK_ERR(sc_supervisor_run(NULL, NULL, NULL, NULL), -EINVAL);
    sc_primary_free(NULL);
    sc_worker_free(NULL);
    sc_listener_close(NULL);
    sc_event_clear(NULL);
    CHECK(sc_policy_parse("none") == SC_POLICY_SHARED);
    CHECK(sc_policy_parse("rr") == SC_POLICY_RR);
    CHECK_ERR(sc_policy_parse("fastest"), -EINVAL);
    CHECK_ERR(sc_policy_parse(NULL), -EINVAL);
    CHECK(!strcmp(sc_policy_name(SC_POLICY_SHARED), "shared") && !sc_policy_name(7));

    CHECK(sc_role(&p, &w) == SC_ROLE_PRIMARY);
    CHECK(p && !w);
    /* Once per process. */
    CHECK_ERR(sc_role(&p2, &w), -EEXIST);
    CHECK(strstr(sc_last_error_message(), "already called"));

    /* Settings: out of range is refused by name and not applied. */
    CHECK_ERR(sc_primary_set_window(p, 0), -EINVAL);
    CHECK(strstr(sc_last_error_message(), "window"));
    CHECK(sc_primary_set_window(p, 8) == 0);
    CHECK_ERR(sc_primary_set_backlog(p, 0), -EINVAL);
    CHECK_ERR(sc_primary_set_policy(p, 9), -EINVAL);
    CHECK(sc_primary_set_policy(p, SC_POLICY_SHARED) == 0);
    CHECK(sc_primary_policy(p) == SC_POLICY_SHARED);
    CHECK(sc_primary_set_policy(p, SC_POLICY_RR) == 0);
    CHECK_ERR(sc_primary_set_env(p, "A=B", "x"), -EINVAL);
    CHECK_ERR(sc_primary_set_env(p, "", "x"), -EINVAL);
    CHECK(sc_primary_set_env(p, "CAPI_TEST", "1") == 0);
    CHECK(sc_primary_set_env(p, "CAPI_TEST", NULL) == 0);
    CHECK_ERR(sc_primary_set_args(p, NULL, 2), -EINVAL);
    CHECK_ERR(sc_primary_listen_rules(p, 42), -EINVAL);
    CHECK_ERR(sc_primary_listen_allow_tcp(p, "not-an-ip", 1, 2), -EINVAL);
    CHECK(strstr(sc_last_error_message(), "not-an-ip"));
    CHECK_ERR(sc_primary_listen_allow_tcp(p, NULL, 5, 1), -EINVAL);
    CHECK(sc_primary_listen_allow_tcp(p, "::1", 8000, 8001) == 0);
    CHECK(sc_primary_listen_allow_unix_dir(p, "/tmp") == 0);
    CHECK(sc_primary_listen_rules(p, SC_LISTEN_DEFAULT) == 0);
    CHECK_ERR(sc_primary_set_user(p, "no-such-user-here", NULL), -EINVAL);
    CHECK(sc_primary_set_user(p, "root", NULL) == 0);
    CHECK(sc_primary_clear_user(p) == 0);

    /* Bad buffers, fds and event sizes. */
    CHECK_ERR(sc_primary_send(p, 1, NULL, 3, NULL, 0), -EINVAL);
    {
        int bad = 1000;
        CHECK_ERR(sc_primary_send(p, 1, "x", 1, &bad, 1), -EBADF);
        CHECK_ERR(sc_primary_send(p, 1, "x", 1, NULL, 1), -EINVAL);
    }
    ev.size = 4;
    CHECK_ERR(sc_primary_try_next_event(p, &ev), -EINVAL);
    CHECK(strstr(sc_last_error_message(), "SC_EVENT_INIT"));
    sc_event_init(&ev);
    info.size = 1;
    CHECK_ERR(sc_primary_worker_info(p, 1, &info), -EINVAL);
    info.size = sizeof info;

    /* The fd to poll is the library's, close-on-exec; nothing to report. */
    CHECK(sc_primary_fd(p) > 2 && cloexec(sc_primary_fd(p)));
    CHECK(sc_primary_poll_timeout(p) == -1);
    CHECK(sc_primary_next_event(p, 0, &ev) == 0);
    CHECK(sc_primary_try_next_event(p, &ev) == 0);
    CHECK(sc_primary_next_event(p, -1, &ev) == 0); /* no worker: over */
    CHECK(sc_primary_worker_ids(p, NULL, 0) == 0);
    CHECK_ERR(sc_primary_worker_info(p, 42, &info), -ENOENT);
    CHECK_ERR(sc_primary_kill(p, 42, SIGTERM), -ENOTCONN);
    CHECK_ERR(sc_primary_send(p, 42, "x", 1, NULL, 0), -ENOTCONN);

    /* Fork failures carry the errno of the step that failed. */
    CHECK(sc_primary_set_exec(p, "/nonexistent/program") == 0);
    CHECK_ERR(sc_primary_fork(p, &id), -ENOENT);
    CHECK(strstr(sc_last_error_message(), "/nonexistent/program"));
    CHECK(sc_primary_set_exec(p, "/etc/passwd") == 0);
    CHECK_ERR(sc_primary_fork(p, &id), -EACCES);
    CHECK(sc_primary_set_cwd(p, "/nonexistent-dir") == 0);
    CHECK(sc_primary_set_exec(p, "/bin/sh") == 0);
    CHECK_ERR(sc_primary_fork(p, &id), -ENOENT);
    CHECK(strstr(sc_last_error_message(), "chdir"));
    CHECK(sc_primary_set_cwd(p, NULL) == 0);
    CHECK(sc_primary_worker_ids(p, NULL, 0) == 0);

    /* Exit statuses: a code, then a signal; FORK comes first. */
    {
        const char *code[] = {"-c", "exit $CAPI_CODE"};
        const char *env[] = {"CAPI_CODE=7"};
        const char *bad_env[] = {"NO_EQUALS"};
        CHECK(sc_primary_set_args(p, code, 2) == 0);
        CHECK_ERR(sc_primary_fork_env(p, bad_env, 1, &id), -EINVAL);
        CHECK(sc_primary_fork_env(p, env, 1, &id) == 0 && id > 0);
        CHECK(sc_primary_worker_ids(p, ids, 4) == 1 && ids[0] == id);
        CHECK(sc_primary_worker_info(p, id, &info) == 0);
        CHECK(info.id == id && info.pid > 0 && info.in_flight == 0);
        CHECK(sc_primary_next_event(p, 10000, &ev) == 1);
        CHECK(ev.kind == SC_EVENT_FORK && ev.id == id);
        int want[] = {SC_EVENT_EXIT, 0};
        expect(p, &ev, want);
        CHECK(ev.id == id && ev.exit_code == 7 && ev.term_signal == 0 && !ev.after_disconnect);
    }
    {
        const char *kill_self[] = {"-c", "kill -KILL $$"};
        CHECK(sc_primary_set_args(p, kill_self, 2) == 0);
        CHECK(sc_primary_fork(p, &id) == 0);
        int want[] = {SC_EVENT_EXIT, 0};
        expect(p, &ev, want);
        CHECK(ev.exit_code == -1 && ev.term_signal == SIGKILL);
    }
    {
        const char *sleep_long[] = {"-c", "exec sleep 30 </dev/null >/dev/null 2>&1"};
        CHECK(sc_primary_set_args(p, sleep_long, 2) == 0);
        CHECK(sc_primary_fork(p, &id) == 0);
        CHECK_ERR(sc_primary_kill(p, id, 0), -EINVAL); /* not a signal */
        CHECK(sc_primary_kill(p, id, SIGTERM) == 0);
        int want[] = {SC_EVENT_EXIT, 0};
        expect(p, &ev, want);
        CHECK(ev.term_signal == SIGTERM);
        CHECK_ERR(sc_primary_kill(p, id, SIGTERM), -ENOTCONN);
    }
    CHECK(sc_primary_next_event(p, -1, &ev) == 0);
    sc_event_clear(&ev);
    sc_primary_free(p);
    printf("ok basics\n");
}

/* ---------------------------------------------------------------- fds */

static void fds_worker(sc_worker *w) {
    sc_event ev = SC_EVENT_INIT;
    CHECK(sc_worker_id(w) == 1);
    CHECK(sc_worker_is_disconnecting(w) == 0);
    /* Blocking receive: the primary's pipe. */
    CHECK(sc_worker_recv(w, &ev) == 1);
    CHECK(ev.kind == SC_EVENT_MESSAGE && ev.len == 4 && !memcmp(ev.data, "pipe", 4));
    CHECK(ev.nfds == 1 && cloexec(ev.fds[0]));
    read_text(ev.fds[0], "to worker");
    /* Two pipes back: the primary takes one and lets the event close the other. */
    int back[2] = {pipe_with("to primary"), pipe_with("dropped")};
    CHECK(sc_worker_send(w, "back", 4, back, 2) == 0);
    close(back[0]);
    close(back[1]);
    /* A Unix socket listener: connect to it ourselves, accept the other end. */
    {
        const char *dir = getenv("CAPI_UNIX_DIR");
        char path[200];
        sc_listener *l;
        int c, fd;
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        CHECK(dir && strlen(dir) < 100);
        snprintf(path, sizeof path, "%s/sock", dir);
        CHECK(sc_worker_listen(w, path, 0, &l) == 0);
        strcpy(sa.sun_path, path);
        CHECK((c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) >= 0);
        CHECK(connect(c, (struct sockaddr *)&sa, sizeof sa) == 0);
        CHECK(write(c, "ping", 4) == 4);
        close(c);
        CHECK(sc_listener_accept(l, &fd) == 0);
        struct sockaddr_un me;
        socklen_t len = sizeof me;
        CHECK(getsockname(fd, (struct sockaddr *)&me, &len) == 0 && me.sun_family == AF_UNIX);
        CHECK(cloexec(fd));
        read_text(fd, "ping");
        close(fd);
        sc_listener_close(l);
        CHECK(sc_worker_send(w, "unix ok", 7, NULL, 0) == 0);
    }
    /* The fd + non-blocking step, as a foreign loop would: until DISCONNECT. */
    int fd = sc_worker_fd(w);
    CHECK(fd > 2 && cloexec(fd));
    for (int turns = 0;; turns++) {
        CHECK(turns < 1000);
        int r = sc_worker_try_next_event(w, &ev);
        CHECK(r >= 0);
        if (r == 1 && ev.kind == SC_EVENT_DISCONNECT) break;
        if (r == 1) continue;
        struct pollfd pfd = {fd, POLLIN, 0};
        int ms = sc_worker_poll_timeout(w);
        CHECK(poll(&pfd, 1, ms < 0 ? 10000 : ms) >= 0);
    }
    CHECK(sc_worker_is_disconnecting(w) == 1);
    CHECK(sc_worker_recv(w, &ev) == 0);
    /* Still connected until it leaves: a worker reports after the request. */
    CHECK(sc_worker_send(w, "late", 4, NULL, 0) == 0);
    CHECK(sc_worker_disconnect(w) == 0);
    CHECK_ERR(sc_worker_send(w, "later", 5, NULL, 0), -ENOTCONN);
    sc_event_clear(&ev);
    sc_worker_free(w);
}

static char dir[] = "/tmp/capi-test-XXXXXX", sock[64];

/* A failed check exits: the temporary directory goes too. */
static void remove_dir(void) {
    unlink(sock);
    rmdir(dir);
}

static void fds_primary(sc_primary *p) {
    sc_event ev = SC_EVENT_INIT;
    uint32_t id;
    char env[64];
    CHECK(mkdtemp(dir));
    atexit(remove_dir);
    snprintf(env, sizeof env, "CAPI_UNIX_DIR=%s", dir);
    snprintf(sock, sizeof sock, "%s/sock", dir);
    const char *vars[] = {env};
    CHECK(sc_primary_set_exec(p, self) == 0);
    CHECK(sc_primary_fork_env(p, vars, 1, &id) == 0 && id == 1);
    int online[] = {SC_EVENT_ONLINE, 0};
    expect(p, &ev, online);
    int r = pipe_with("to worker");
    CHECK(sc_primary_send(p, id, "pipe", 4, &r, 1) == 0);
    close(r); /* borrowed: the library keeps what it needs */
    /* The primary in a foreign loop: poll its fd, step until nothing is left. */
    int fd = sc_primary_fd(p), got = 0;
    for (int turns = 0; !got; turns++) {
        CHECK(turns < 1000);
        struct pollfd pfd = {fd, POLLIN, 0};
        int ms = sc_primary_poll_timeout(p);
        CHECK(poll(&pfd, 1, ms < 0 ? 10000 : ms) >= 0);
        while (!got && sc_primary_try_next_event(p, &ev) == 1) got = ev.kind == SC_EVENT_MESSAGE;
    }
    CHECK(ev.id == id && ev.len == 4 && !memcmp(ev.data, "back", 4) && ev.nfds == 2);
    CHECK(cloexec(ev.fds[0]) && cloexec(ev.fds[1]));
    int mine = ev.fds[0], dropped = ev.fds[1];
    ev.fds[0] = -1; /* taken */
    sc_event_clear(&ev);
    CHECK(is_open(mine) && !is_open(dropped));
    read_text(mine, "to primary");
    close(mine);
    int listening[] = {SC_EVENT_LISTENING, 0};
    expect(p, &ev, listening);
    CHECK(ev.id == id && !strcmp(ev.text, sock));
    int message[] = {SC_EVENT_MESSAGE, 0};
    expect(p, &ev, message);
    CHECK(ev.len == 7 && !memcmp(ev.data, "unix ok", 7));
    CHECK(sc_primary_disconnect(p, id, 5000) == 0);
    int exit_kind[] = {SC_EVENT_EXIT, 0};
    expect(p, &ev, exit_kind);
    CHECK(ev.id == id && ev.exit_code == 0 && ev.term_signal == 0 && ev.after_disconnect == 1);
    /* The primary removed the socket file once the last listener closed. */
    struct stat st;
    CHECK(stat(sock, &st) == -1 && errno == ENOENT);
    CHECK(sc_primary_next_event(p, -1, &ev) == 0);
    sc_event_clear(&ev);
    sc_primary_free(p);
    printf("ok fds\n");
}

/* ------------------------------------------------------------ cluster */

static void cluster_worker(sc_worker *w) {
    sc_listener *l;
    sc_event ev = SC_EVENT_INIT;
    uint32_t me = sc_worker_id(w);
    CHECK(sc_worker_leave_stop_signals_to_primary(w) == 0);
    /* The listen rules: port 1 is refused by name, the worker goes on. */
    CHECK_ERR(sc_worker_listen(w, "127.0.0.1:1", 0, &l), -EACCES);
    CHECK(strstr(sc_last_error_message(), "127.0.0.1:1"));
    CHECK_ERR(sc_worker_listen_with(w, "127.0.0.1:0", 0, 1u << 7, &l), -EINVAL);
    CHECK(strstr(sc_last_error_message(), "SC_OPT_"));
    CHECK_ERR(sc_worker_listen_with(w, "/tmp/x.sock", 0, SC_OPT_DEFER_ACCEPT, &l), -EINVAL);
    /* Worker 2 takes non-blocking connections, once their request came. */
    unsigned opts = me == 1 ? 0 : SC_OPT_DEFER_ACCEPT | SC_OPT_NONBLOCKING_CONNECTIONS;
    CHECK(sc_worker_listen_with(w, "127.0.0.1:0", 0, opts, &l) == 0);
    if (me == 1) {
        /* Never accepts: connections handed to it stay in flight. */
        while (sc_worker_recv(w, &ev) == 1) {}
    } else {
        char buf[1024], msg[64];
        unsigned served = 0;
        int c, r;
        while ((r = sc_listener_accept(l, &c)) == 0) {
            CHECK(cloexec(c));
            CHECK(fcntl(c, F_GETFL) & O_NONBLOCK);
            /* Deferred: the request is there already. */
            ssize_t n = read(c, buf, sizeof buf);
            CHECK(n > 0);
            int len = snprintf(buf, sizeof buf, "HTTP/1.0 200 OK\r\n\r\nworker %u\n", me);
            CHECK(write(c, buf, (size_t)len) == len);
            close(c);
            served++;
        }
        CHECK_ERR(r, -ECONNABORTED);
        int len = snprintf(msg, sizeof msg, "served %u", served);
        CHECK(sc_worker_send(w, msg, (size_t)len, NULL, 0) == 0);
    }
    sc_event_clear(&ev);
    sc_listener_close(l);
    sc_worker_free(w);
}

static void cluster_primary(sc_primary *p) {
    sc_event ev = SC_EVENT_INIT;
    int listening = 0, killed = 0, stopping = 0;
    CHECK(sc_primary_set_exec(p, self) == 0);
    CHECK(sc_primary_set_policy(p, SC_POLICY_RR) == 0);
    CHECK(sc_primary_set_window(p, 1) == 0);
    CHECK(sc_primary_listen_allow_tcp(p, "127.0.0.1", 0, 0) == 0);
    CHECK(sc_primary_listen_allow_tcp(p, "127.0.0.1", 1024, 65535) == 0);
    CHECK(sc_primary_fork(p, NULL) == 0 && sc_primary_fork(p, NULL) == 0);
    for (;;) {
        int r = sc_primary_next_event(p, 20, &ev);
        CHECK(r >= 0);
        if (r == 0) {
            sc_worker_info info = SC_WORKER_INFO_INIT;
            if (!killed && listening == 2 && sc_primary_worker_info(p, 1, &info) == 0 &&
                info.in_flight > 0) {
                printf("killing 1 with %zu in flight\n", info.in_flight);
                CHECK(sc_primary_kill(p, 1, SIGKILL) == 0);
                killed = 1;
            }
            if (stopping && sc_primary_worker_ids(p, NULL, 0) == 0) break; /* all exited */
            continue;
        }
        switch (ev.kind) {
        case SC_EVENT_LISTENING:
            if (++listening == 2) printf("listening on http://%s\n", ev.text);
            break;
        case SC_EVENT_EXIT:
            printf("exit %u code %d signal %d after %d\n", ev.id, ev.exit_code, ev.term_signal,
                   ev.after_disconnect);
            break;
        case SC_EVENT_MESSAGE:
            printf("message %u %.*s\n", ev.id, (int)ev.len, (const char *)ev.data);
            break;
        case SC_EVENT_SIGNAL:
            if (ev.signal == SIGTERM && !stopping) {
                printf("stopping\n");
                CHECK(sc_primary_disconnect_all(p, 5000) == 0);
                stopping = 1;
            }
            break;
        case SC_EVENT_ERROR:
            printf("error %u %s\n", ev.id, ev.text);
            break;
        default:
            break;
        }
    }
    sc_event_clear(&ev);
    sc_primary_free(p);
    printf("done\n");
}

/* --------------------------------------------------------- supervisor */

static void supervisor_worker(sc_worker *w) {
    sc_listener *l;
    sc_event ev = SC_EVENT_INIT;
    CHECK(sc_worker_listen(w, "127.0.0.1:0", 0, &l) == 0);
    for (;;) {
        CHECK(sc_worker_next_event(w, -1, &ev) == 1);
        if (ev.kind == SC_EVENT_DISCONNECT) break;
        if (ev.kind == SC_EVENT_MESSAGE) {
            char reply[64];
            int n = snprintf(reply, sizeof reply, "echo %.*s", (int)ev.len, (const char *)ev.data);
            CHECK(sc_worker_send(w, reply, (size_t)n, NULL, 0) == 0);
        }
    }
    sc_event_clear(&ev);
    sc_listener_close(l);
    sc_worker_free(w);
}

struct seen {
    int ready, echoes, stopping, exits, forks;
};

static void on_notice(sc_supervisor *s, sc_event *ev, void *user) {
    struct seen *seen = (struct seen *)user;
    sc_primary *p = sc_supervisor_primary(s);
    sc_event other = SC_EVENT_INIT;
    uint32_t ids[8];
    CHECK(p != NULL);
    switch (ev->kind) {
    case SC_EVENT_FORK:
        seen->forks++;
        break;
    case SC_EVENT_READY:
        seen->ready++;
        CHECK(sc_supervisor_target(s) == 2);
        /* The supervisor takes the primary's events: pulling them is refused. */
        CHECK_ERR(sc_primary_next_event(p, 0, &other), -EBUSY);
        CHECK_ERR(sc_primary_try_next_event(p, &other), -EBUSY);
        CHECK(strstr(sc_last_error_message(), "supervisor"));
        CHECK_ERR(sc_supervisor_run(p, NULL, NULL, NULL), -EBUSY);
        sc_primary_free(p); /* ignored while the supervisor runs it */
        CHECK(sc_primary_policy(p) == SC_POLICY_RR);
        CHECK(sc_primary_fd(p) > 2);
        CHECK(sc_primary_worker_ids(p, ids, 8) == 2);
        for (int i = 0; i < 2; i++) CHECK(sc_primary_send(p, ids[i], "hi", 2, NULL, 0) == 0);
        break;
    case SC_EVENT_MESSAGE:
        CHECK(ev->len == 7 && !memcmp(ev->data, "echo hi", 7));
        if (++seen->echoes == 2) CHECK(sc_supervisor_stop(s) == 0);
        break;
    case SC_EVENT_STOPPING:
        CHECK(ev->graceful == 1);
        seen->stopping++;
        break;
    case SC_EVENT_EXIT:
        CHECK(ev->after_disconnect == 1 && ev->exit_code == 0);
        seen->exits++;
        break;
    case SC_EVENT_RESPAWNING:
    case SC_EVENT_ERROR:
        fprintf(stderr, "unexpected event %d: %s\n", ev->kind, ev->text ? ev->text : "");
        exit(1);
    }
}

static void supervisor_primary(sc_primary *p) {
    sc_supervisor_config config = SC_SUPERVISOR_CONFIG_INIT;
    struct seen seen = {0, 0, 0, 0, 0};
    config.workers = 2;
    config.graceful_timeout_ms = 5000;
    CHECK(sc_primary_set_exec(p, self) == 0);
    /* Returns once the stop finished; p is freed. */
    CHECK(sc_supervisor_run(p, &config, on_notice, &seen) == 0);
    CHECK(seen.forks == 2 && seen.ready == 1 && seen.echoes == 2 && seen.stopping == 1 &&
          seen.exits == 2);
    printf("ok supervisor\n");
}

int main(int argc, char **argv) {
    sc_primary *p;
    sc_worker *w;
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2) {
        fprintf(stderr, "usage: capi_test basics|fds|supervisor|cluster\n");
        return 2;
    }
    CHECK(realpath(argv[0], self));
    if (!strcmp(argv[1], "basics")) {
        basics();
        return 0;
    }
    CHECK(sc_role(&p, &w) > 0);
    if (!strcmp(argv[1], "fds")) {
        if (w) fds_worker(w);
        else fds_primary(p);
    } else if (!strcmp(argv[1], "supervisor")) {
        if (w) supervisor_worker(w);
        else supervisor_primary(p);
    } else if (!strcmp(argv[1], "cluster")) {
        if (w) cluster_worker(w);
        else cluster_primary(p);
    } else {
        return 2;
    }
    return 0;
}
