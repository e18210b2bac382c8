/* syncluster inside libuv: the hello-world cluster of examples/hello.rs
 * with every process driven by a libuv loop.
 *
 *   target/c/uv_worker [--workers N] [--host H] [--port P] [--policy rr|shared]
 *
 * Same contract as hello: `listening on http://HOST:PORT (N workers,
 * POLICY)` once every worker listens; on SIGTERM or SIGINT a graceful stop,
 * `served {"1":N1,...}` and exit 0.
 *
 * A WORKER polls syncluster's worker fd with uv_poll_t. When it is
 * readable (or sc_worker_poll_timeout() has passed, with a uv_timer_t), it
 * drains sc_worker_try_next_event(): each CONNECTION's fd becomes a
 * uv_tcp_t of the same loop, so one single-threaded worker serves many
 * connections at once (keep-alive and pipelining too). DISCONNECT stops
 * taking connections; the worker closes its idle ones, lets the others
 * finish, and leaves the loop.
 *
 * The PRIMARY is the raw sc_primary in a libuv loop: uv_poll_t on
 * sc_primary_fd(), a timer for sc_primary_poll_timeout(), and
 * sc_primary_try_next_event() until it returns 0. It turns SIGTERM into
 * sc_primary_disconnect_all() and stops once every worker has exited.
 *
 * Build: scripts/build_c.sh (target/c/uv_worker). */
#define _GNU_SOURCE
#include <uv.h>

#include "common.h"

static uv_loop_t *loop;
static sc_event ev = SC_EVENT_INIT;

/* A timer for the step's deadline; fires the step again. */
static void arm(uv_timer_t *timer, int ms, uv_timer_cb cb) {
    if (ms < 0) uv_timer_stop(timer);
    else uv_timer_start(timer, cb, (uint64_t)ms, 0);
}

/* ------------------------------------------------------------ a worker */

struct conn {
    uv_tcp_t tcp;
    uv_write_t write;
    uv_shutdown_t shutdown;
    char buf[MAX_HEAD + 1024];
    size_t len;
    unsigned long long discard; /* body bytes still to skip */
    int writing, closing, lingering;
    unsigned long answered;
    char err[256];
};

static struct {
    sc_worker *w;
    sc_listener *listener;
    uv_poll_t poll;
    uv_timer_t timer;
    int draining;
    size_t open;
    unsigned long long served;
    struct conn **conns; /* open connections, to close the idle ones on a drain */
    size_t n_conns, cap_conns;
} W;

static void worker_step(void);
static void worker_finish(void);
static void worker_timer(uv_timer_t *t);

static void conn_closed(uv_handle_t *h) {
    struct conn *c = (struct conn *)h->data;
    for (size_t i = 0; i < W.n_conns; i++)
        if (W.conns[i] == c) W.conns[i] = W.conns[--W.n_conns];
    free(c);
    W.open--;
    if (W.draining && W.open == 0) worker_finish();
}

static void conn_close(struct conn *c) {
    if (c->closing) return;
    c->closing = 1;
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void conn_alloc(uv_handle_t *h, size_t want, uv_buf_t *buf) {
    struct conn *c = (struct conn *)h->data;
    (void)want;
    if (c->lingering) { /* discarding until EOF */
        *buf = uv_buf_init(c->buf, sizeof c->buf);
        return;
    }
    *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - c->len));
}

static void conn_answer(struct conn *c);

static void conn_shut(uv_shutdown_t *req, int status) {
    (void)status;
    struct conn *c = (struct conn *)req->data;
    c->lingering = 1; /* close once the client does: no RST for what it still sends */
}

static void conn_written(uv_write_t *req, int status) {
    struct conn *c = (struct conn *)req->data;
    c->writing = 0;
    if (status < 0) return conn_close(c);
    conn_answer(c); /* the next pipelined request, if any */
}

/* Answers the next complete request in the buffer, one write at a time. */
static void conn_answer(struct conn *c) {
    struct http_req r;
    if (c->writing || c->closing || c->lingering) return;
    while (c->discard && c->len) {
        size_t n = c->discard < c->len ? (size_t)c->discard : c->len;
        memmove(c->buf, c->buf + n, c->len - n);
        c->len -= n;
        c->discard -= n;
    }
    if (c->discard || !http_parse(c->buf, c->len, &r)) {
        if (c->len == sizeof c->buf) conn_close(c);
        /* Idle while stopping (a fresh connection still gets its first answer). */
        else if (W.draining && c->len == 0 && c->answered) conn_close(c);
        return;
    }
    const char *out = HELLO_KEEP;
    size_t out_len = sizeof HELLO_KEEP - 1;
    int keep = r.keep_alive && !W.draining;
    if (r.status) {
        out_len = http_error(r.status, c->err, sizeof c->err);
        out = c->err;
        keep = 0;
    } else if (!keep) {
        out = HELLO_CLOSE;
        out_len = sizeof HELLO_CLOSE - 1;
    }
    if (r.head_only && !r.status) out_len -= HELLO_BODY_LEN;
    size_t used = r.head_len < c->len ? r.head_len : c->len;
    memmove(c->buf, c->buf + used, c->len - used);
    c->len -= used;
    c->discard = r.body;
    c->answered++;
    uv_buf_t b = uv_buf_init((char *)out, (unsigned)out_len); /* static, or c->err */
    c->writing = 1;
    if (uv_write(&c->write, (uv_stream_t *)&c->tcp, &b, 1, conn_written) < 0) return conn_close(c);
    if (!keep) {
        c->shutdown.data = c;
        if (uv_shutdown(&c->shutdown, (uv_stream_t *)&c->tcp, conn_shut) < 0) conn_close(c);
    }
}

static void conn_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    struct conn *c = (struct conn *)s->data;
    (void)buf;
    if (n < 0) return conn_close(c); /* EOF or an error */
    if (c->lingering) return;
    c->len += (size_t)n;
    conn_answer(c);
}

/* A connection syncluster handed over: a plain fd, ours now. */
static void conn_new(int fd) {
    struct conn *c = (struct conn *)calloc(1, sizeof *c);
    if (!c || uv_tcp_init(loop, &c->tcp) < 0) {
        free(c);
        close(fd);
        return;
    }
    c->tcp.data = c;
    c->write.data = c;
    W.open++;
    W.served++;
    if (W.n_conns == W.cap_conns) {
        size_t cap = W.cap_conns ? 2 * W.cap_conns : 64;
        struct conn **more = (struct conn **)realloc(W.conns, cap * sizeof *more);
        if (more) W.conns = more, W.cap_conns = cap;
    }
    if (W.n_conns < W.cap_conns) W.conns[W.n_conns++] = c;
    if (uv_tcp_open(&c->tcp, fd) < 0) {
        close(fd);
        return conn_close(c);
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (uv_read_start((uv_stream_t *)&c->tcp, conn_alloc, conn_read) < 0) conn_close(c);
}

/* Leaves the loop: nothing is open and no more connections come. */
static void worker_finish(void) {
    if (!uv_is_closing((uv_handle_t *)&W.poll)) uv_close((uv_handle_t *)&W.poll, NULL);
    if (!uv_is_closing((uv_handle_t *)&W.timer)) uv_close((uv_handle_t *)&W.timer, NULL);
}

/* The primary asked us to stop: syncluster stopped listening for us;
 * close the idle connections and let the busy ones finish. */
static void worker_drain(void) {
    W.draining = 1;
    for (size_t i = W.n_conns; i-- > 0;) conn_answer(W.conns[i]); /* closes the idle ones */
}

/* syncluster's non-blocking step: everything that is ready now. */
static void worker_step(void) {
    int r;
    while ((r = sc_worker_try_next_event(W.w, &ev)) == 1) {
        switch (ev.kind) {
        case SC_EVENT_CONNECTION:
            conn_new(ev.fd);
            ev.fd = -1; /* taken: the uv_tcp_t owns it */
            break;
        case SC_EVENT_DISCONNECT:
            worker_drain();
            break;
        case SC_EVENT_MESSAGE: /* an echo, for whoever asks */
            sc_worker_send(W.w, ev.data, ev.len, NULL, 0);
            break;
        default:
            break;
        }
    }
    sc_event_clear(&ev);
    if (r < 0) {
        fprintf(stderr, "worker %u: %s\n", sc_worker_id(W.w), sc_last_error_message());
        if (!W.draining) worker_drain();
    }
    if (W.draining && W.open == 0) return worker_finish();
    arm(&W.timer, sc_worker_poll_timeout(W.w), worker_timer);
}

static void worker_readable(uv_poll_t *p, int status, int events) {
    (void)p, (void)status, (void)events;
    worker_step();
}

static void worker_timer(uv_timer_t *t) {
    (void)t;
    worker_step();
}

static int run_worker(sc_worker *w, const struct options *o) {
    char addr[160];
    W.w = w;
    if (sc_worker_leave_stop_signals_to_primary(w) < 0) {
        fprintf(stderr, "worker %u: %s\n", sc_worker_id(w), sc_last_error_message());
        sc_worker_free(w);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    listen_addr(o, addr, sizeof addr);
    if (sc_worker_listen_with(w, addr, 0, o->deferred ? SC_OPT_DEFER_ACCEPT : 0, &W.listener) < 0) {
        int stopping = sc_worker_is_disconnecting(w) == 1;
        if (!stopping) fprintf(stderr, "worker %u: %s\n", sc_worker_id(w), sc_last_error_message());
        sc_worker_send(w, "served 0", 8, NULL, 0);
        sc_worker_free(w);
        return stopping ? 0 : EXIT_LISTEN_FAILED;
    }
    loop = uv_default_loop();
    uv_timer_init(loop, &W.timer);
    /* Level-triggered readability of syncluster's epoll fd. */
    uv_poll_init(loop, &W.poll, sc_worker_fd(w));
    uv_poll_start(&W.poll, UV_READABLE, worker_readable);
    worker_step();
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    if (W.listener) sc_listener_close(W.listener);
    char msg[40];
    int n = snprintf(msg, sizeof msg, "served %llu", W.served);
    sc_worker_send(w, msg, (size_t)n, NULL, 0);
    sc_worker_free(w);
    free(W.conns);
    return 0;
}

/* ---------------------------------------------------------- the primary */

static struct {
    sc_primary *p;
    uv_poll_t poll;
    uv_timer_t timer;
    long workers;
    const char *policy;
    size_t listening;
    int stopping, failed;
    struct served served;
} P;

static void primary_timer(uv_timer_t *t);

static void primary_done(void) {
    uv_close((uv_handle_t *)&P.poll, NULL);
    uv_close((uv_handle_t *)&P.timer, NULL);
}

static void primary_step(void) {
    char line[512];
    int r;
    while ((r = sc_primary_try_next_event(P.p, &ev)) == 1) {
        switch (ev.kind) {
        case SC_EVENT_LISTENING:
            if (++P.listening == (size_t)P.workers) {
                snprintf(line, sizeof line, "listening on http://%s (%ld workers, %s)", ev.text,
                         P.workers, P.policy);
                say(line);
            }
            break;
        case SC_EVENT_MESSAGE:
            served_record(&P.served, ev.id, ev.data, ev.len);
            break;
        case SC_EVENT_SIGNAL:
            if (ev.signal == SIGTERM || ev.signal == SIGINT || ev.signal == SIGQUIT) {
                P.stopping = 1;
                if (sc_primary_disconnect_all(P.p, 10000) < 0)
                    fprintf(stderr, "uv_worker: %s\n", sc_last_error_message());
            }
            break;
        case SC_EVENT_EXIT:
            if (!ev.after_disconnect) {
                exit_text(&ev, line, sizeof line);
                fprintf(stderr, "worker %u died (%s)\n", ev.id, line);
                if (!ev.term_signal && ev.exit_code == EXIT_LISTEN_FAILED) P.failed = 1;
                if (!P.stopping) { /* no supervisor here: stop, rather than serve with fewer */
                    P.stopping = P.failed = 1;
                    sc_primary_disconnect_all(P.p, 10000);
                }
            }
            break;
        case SC_EVENT_ERROR:
            fprintf(stderr, "worker %u: %s\n", ev.id, ev.text);
            break;
        default:
            break;
        }
    }
    sc_event_clear(&ev);
    if (r < 0) {
        fprintf(stderr, "uv_worker: %s\n", sc_last_error_message());
        P.failed = 1;
        return primary_done();
    }
    if (sc_primary_worker_ids(P.p, NULL, 0) == 0) return primary_done();
    arm(&P.timer, sc_primary_poll_timeout(P.p), primary_timer);
}

static void primary_timer(uv_timer_t *t) {
    (void)t;
    primary_step();
}

static void primary_readable(uv_poll_t *p, int status, int events) {
    (void)p, (void)status, (void)events;
    primary_step();
}

static int run_primary(sc_primary *p, const struct options *o) {
    P.p = p;
    P.workers = o->workers;
    if (o->policy) sc_primary_set_policy(p, o->policy);
    P.policy = sc_policy_name(sc_primary_policy(p));
    for (long i = 0; i < o->workers; i++) {
        if (sc_primary_fork(p, NULL) < 0) {
            fprintf(stderr, "uv_worker: %s\n", sc_last_error_message());
            sc_primary_disconnect_all(p, 0);
            P.failed = 1;
            break;
        }
    }
    loop = uv_default_loop();
    uv_timer_init(loop, &P.timer);
    uv_poll_init(loop, &P.poll, sc_primary_fd(p));
    uv_poll_start(&P.poll, UV_READABLE, primary_readable);
    primary_step();
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    sc_primary_free(p);
    if (P.failed) return 1;
    served_print(&P.served);
    return 0;
}

int main(int argc, char **argv) {
    struct options o;
    char why[256];
    sc_primary *p;
    sc_worker *w;
    switch (parse_args(argc, argv, &o, why, sizeof why)) {
    case 1: usage(stdout, "uv_worker"); return 0;
    case -1: fprintf(stderr, "uv_worker: %s\n", why); usage(stderr, "uv_worker"); return 2;
    }
    if (o.policy) unsetenv("SYNCLUSTER_SCHED_POLICY");
    int role = sc_role(&p, &w);
    if (role < 0) {
        fprintf(stderr, "uv_worker: %s\n", sc_last_error_message());
        return 2;
    }
    return role == SC_ROLE_WORKER ? run_worker(w, &o) : run_primary(p, &o);
}
