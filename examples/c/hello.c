/* The hello-world HTTP/1.1 cluster of examples/hello.rs, in C, on
 * syncluster's C API (include/syncluster.h).
 *
 *   target/c/hello [--workers N] [--host H] [--port P] [--policy rr|shared] [--deferred]
 *
 * The primary runs syncluster's supervisor (respawn with backoff, graceful
 * stop on SIGTERM/SIGINT, immediate stop on SIGQUIT, rolling reload on
 * SIGHUP, scaling on SIGTTIN/SIGTTOU), prints
 * `listening on http://HOST:PORT (N workers, POLICY)` once every worker
 * listens, and on SIGTERM prints `served {"1":N1,...}` (connections served
 * per worker) and exits 0.
 *
 * Each worker is the simplest kind: a blocking accept loop, one connection
 * at a time, through syncluster's round robin (or a shared socket). The
 * connections are plain fds; the answers are the bytes of
 * examples/common/http.rs. Keep-alive and pipelining work; an idle
 * connection is closed after HELLO_READ_TIMEOUT_MS (10 s).
 *
 * Exit status: 0 after SIGTERM/SIGINT/SIGQUIT; 1 if it could not start or
 * keep running (a worker could not listen...); 2 for bad arguments.
 *
 * Build: scripts/build_c.sh (target/c/hello). */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <sys/time.h>

#include "common.h"

/* ------------------------------------------------------------ a worker */

/* Answers the requests of one connection until the client closes, asks
 * to close, stalls past the read timeout, or sends a bad request. */
static void serve(int c) {
    char buf[MAX_HEAD + 1024];
    size_t len = 0;
    unsigned long long discard = 0; /* body bytes still to skip */
    for (;;) {
        struct http_req r;
        while (discard && len) { /* a body: read and dropped */
            size_t n = discard < len ? (size_t)discard : len;
            memmove(buf, buf + n, len - n);
            len -= n;
            discard -= n;
        }
        if (discard || !http_parse(buf, len, &r)) {
            if (len == sizeof buf) return;
            ssize_t n = read(c, buf + len, sizeof buf - len);
            if (n <= 0) return; /* EOF, error or the read timeout */
            len += (size_t)n;
            continue;
        }
        const char *out = HELLO_KEEP;
        size_t out_len = sizeof HELLO_KEEP - 1;
        char err[256];
        if (r.status) {
            out = err;
            out_len = http_error(r.status, err, sizeof err);
            r.keep_alive = 0;
        } else if (!r.keep_alive) {
            out = HELLO_CLOSE;
            out_len = sizeof HELLO_CLOSE - 1;
        }
        if (r.head_only && !r.status) out_len -= HELLO_BODY_LEN;
        if (write(c, out, out_len) != (ssize_t)out_len) return;
        size_t used = r.head_len < len ? r.head_len : len;
        if (!r.keep_alive) {
            /* Bytes of the client's still unread would turn close() into
             * an RST, which can destroy the response in flight: read them
             * to EOF first. With none (the usual case) close at once;
             * waiting for the client's FIN would cost this blocking worker
             * a round trip per connection. */
            if (used < len || r.body) {
                shutdown(c, SHUT_WR);
                while (read(c, buf, sizeof buf) > 0) {}
            }
            return;
        }
        memmove(buf, buf + used, len - used); /* keep a pipelined next request */
        len -= used;
        discard = r.body;
    }
}

static int run_worker(sc_worker *w, const struct options *o) {
    char addr[160];
    sc_listener *l;
    unsigned long long served = 0;
    int status = 0;
    /* Ctrl-C signals the whole process group, and a service manager may
     * SIGTERM every process: the primary alone decides when workers stop,
     * so that they finish their connections and report. */
    if (sc_worker_leave_stop_signals_to_primary(w) < 0) {
        fprintf(stderr, "worker %u: %s\n", sc_worker_id(w), sc_last_error_message());
        sc_worker_free(w);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN); /* a client that hung up costs its connection only */
    listen_addr(o, addr, sizeof addr);
    if (sc_worker_listen_with(w, addr, 0, o->deferred ? SC_OPT_DEFER_ACCEPT : 0, &l) < 0) {
        /* Stopped before it started: nothing served, nothing wrong. */
        if (sc_worker_is_disconnecting(w) == 1) goto report;
        fprintf(stderr, "worker %u: %s\n", sc_worker_id(w), sc_last_error_message());
        sc_worker_free(w);
        return EXIT_LISTEN_FAILED;
    }
    struct timeval tv = {o->read_timeout_ms / 1000, (o->read_timeout_ms % 1000) * 1000};
    for (;;) {
        int c, r = sc_listener_accept(l, &c);
        if (r == -ECONNABORTED) break; /* disconnecting, and every handed-over connection taken */
        if (r == -EINTR) continue;
        if (r < 0) {
            fprintf(stderr, "worker %u: %s\n", sc_worker_id(w), sc_last_error_message());
            status = 1;
            break;
        }
        served++;
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        serve(c);
        close(c);
    }
    sc_listener_close(l);
report:;
    char msg[40];
    int n = snprintf(msg, sizeof msg, "served %llu", served);
    /* The primary may be gone already; then nobody is listening anyway. */
    sc_worker_send(w, msg, (size_t)n, NULL, 0);
    sc_worker_free(w);
    return status;
}

/* ---------------------------------------------------------- the primary */

struct cluster {
    long workers;
    const char *policy;
    uint32_t listening[4096]; /* workers that listen; the line comes when all N first do */
    size_t n_listening;
    int announced;
    int failed; /* a worker could not listen: stop, and exit non-zero */
    struct served served;
};

static void forget(struct cluster *c, uint32_t id) {
    for (size_t i = 0; i < c->n_listening; i++)
        if (c->listening[i] == id) c->listening[i] = c->listening[--c->n_listening];
}

/* The supervisor's report, on the primary's thread. */
static void on_notice(sc_supervisor *s, sc_event *ev, void *user) {
    struct cluster *c = (struct cluster *)user;
    char line[512];
    switch (ev->kind) {
    case SC_EVENT_LISTENING:
        if (c->announced) {
            fprintf(stderr, "worker %u is listening (a replacement)\n", ev->id);
            break;
        }
        forget(c, ev->id);
        if (c->n_listening < sizeof c->listening / sizeof *c->listening)
            c->listening[c->n_listening++] = ev->id;
        if ((long)c->n_listening >= c->workers) {
            c->announced = 1;
            /* The primary's address has port 0 resolved. */
            snprintf(line, sizeof line, "listening on http://%s (%ld workers, %s)", ev->text,
                     c->workers, c->policy);
            say(line);
        }
        break;
    case SC_EVENT_MESSAGE:
        served_record(&c->served, ev->id, ev->data, ev->len);
        break;
    case SC_EVENT_EXIT:
        forget(c, ev->id);
        if (!ev->term_signal && ev->exit_code == EXIT_LISTEN_FAILED) {
            fprintf(stderr, "worker %u could not listen; stopping\n", ev->id);
            c->failed = 1;
            sc_supervisor_stop(s);
        } else if (!ev->after_disconnect) {
            exit_text(ev, line, sizeof line);
            fprintf(stderr, "worker %u died (%s)\n", ev->id, line);
        }
        break;
    case SC_EVENT_ERROR:
        fprintf(stderr, "worker %u: %s\n", ev->id, ev->text);
        break;
    case SC_EVENT_HUNG:
        fprintf(stderr, "worker %u hung; killed\n", ev->id);
        break;
    case SC_EVENT_RESPAWNING:
        if (c->failed) break; /* announced before we chose to stop */
        if (ev->delay_ms)
            fprintf(stderr, "worker %u: forking a replacement in %llu ms\n", ev->id,
                    (unsigned long long)ev->delay_ms);
        else
            fprintf(stderr, "worker %u: forking a replacement\n", ev->id);
        break;
    case SC_EVENT_CRASH_LOOP:
        if (!c->failed) fprintf(stderr, "workers keep dying (%u in a row); backing off\n", ev->count);
        break;
    case SC_EVENT_STOPPING:
        fprintf(stderr, "stopping %s\n", ev->graceful ? "gracefully" : "now");
        break;
    case SC_EVENT_FORCE_KILLED:
        fprintf(stderr, "graceful timeout: killed workers [");
        for (size_t i = 0; i < ev->nids; i++) fprintf(stderr, "%s%u", i ? ", " : "", ev->ids[i]);
        fprintf(stderr, "]\n");
        break;
    case SC_EVENT_SCALE_REFUSED:
        fprintf(stderr, "not scaling up: %s\n", ev->text);
        break;
    case SC_EVENT_RELOADING: fprintf(stderr, "Reloading\n"); break;
    case SC_EVENT_RELOADED: fprintf(stderr, "Reloaded\n"); break;
    case SC_EVENT_RELOAD_FAILED: fprintf(stderr, "ReloadFailed(%s)\n", ev->text); break;
    case SC_EVENT_REPLACED: fprintf(stderr, "Replaced { old: %u, new: %u }\n", ev->id, ev->new_id); break;
    case SC_EVENT_SCALED: fprintf(stderr, "Scaled { workers: %u }\n", ev->count); break;
    case SC_EVENT_OTHER: fprintf(stderr, "%s\n", ev->text); break;
    default: break; /* FORK, ONLINE, DISCONNECT, SIGNAL, READY, RESPAWNED */
    }
}

static int run_primary(sc_primary *p, const struct options *o) {
    static struct cluster c; /* zeroed; large */
    sc_supervisor_config config = SC_SUPERVISOR_CONFIG_INIT;
    c.workers = o->workers;
    if (o->policy && sc_primary_set_policy(p, o->policy) < 0) {
        fprintf(stderr, "hello: %s\n", sc_last_error_message());
        sc_primary_free(p);
        return 1;
    }
    c.policy = sc_policy_name(sc_primary_policy(p));
    if (!c.policy) c.policy = "?";
    config.workers = (uint32_t)o->workers;
    config.hang_timeout_ms = (uint32_t)o->hang_timeout_ms;
    /* Returns once a stop finished: every worker exited and reported. */
    if (sc_supervisor_run(p, &config, on_notice, &c) < 0) {
        fprintf(stderr, "hello: %s\n", sc_last_error_message());
        return 1;
    }
    if (c.failed) return 1;
    served_print(&c.served);
    return 0;
}

int main(int argc, char **argv) {
    struct options o;
    char why[256];
    sc_primary *p;
    sc_worker *w;
    switch (parse_args(argc, argv, &o, why, sizeof why)) {
    case 1: usage(stdout, "hello"); return 0;
    case -1: fprintf(stderr, "hello: %s\n", why); usage(stderr, "hello"); return 2;
    }
    /* The flag wins: a stale or bad value in the environment must not stop sc_role. */
    if (o.policy) unsetenv("SYNCLUSTER_SCHED_POLICY");
    int role = sc_role(&p, &w);
    if (role < 0) {
        fprintf(stderr, "hello: %s\n", sc_last_error_message());
        return 2;
    }
    return role == SC_ROLE_WORKER ? run_worker(w, &o) : run_primary(p, &o);
}
