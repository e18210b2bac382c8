#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include "syncluster.h"

int main(int argc, char **argv) {
    const char *addr = argc > 1 ? argv[1] : "127.0.0.1:8000"; /* workers get the same argv */
    sc_primary *p;
    sc_worker *w;
    if (sc_role(&p, &w) < 0) return fprintf(stderr, "%s\n", sc_last_error_message()), 1;
    if (w) { /* a worker: accept until the primary says stop */
        sc_listener *l;
        int c;
        if (sc_worker_listen(w, addr, 0, &l) < 0) return 3;
        while (sc_listener_accept(l, &c) == 0) { /* -ECONNABORTED once stopping */
            dprintf(c, "hello from worker %u\n", sc_worker_id(w));
            close(c); /* the connection is ours */
        }
        sc_listener_close(l);
        sc_worker_free(w);
        return 0;
    }
    sc_event ev = SC_EVENT_INIT; /* the primary: fork, then events until none is left */
    for (int i = 0; i < 2; i++) sc_primary_fork(p, NULL);
    while (sc_primary_next_event(p, -1, &ev) == 1) {
        if (ev.kind == SC_EVENT_LISTENING) printf("worker %u listens on %s\n", ev.id, ev.text);
        if (ev.kind == SC_EVENT_SIGNAL && ev.signal == SIGTERM) sc_primary_disconnect_all(p, 10000);
        if (ev.kind == SC_EVENT_EXIT) printf("worker %u exited with %d\n", ev.id, ev.exit_code);
        fflush(stdout);
    }
    sc_event_clear(&ev); /* frees what the last event held */
    sc_primary_free(p);
    return 0;
}
