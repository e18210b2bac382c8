/* syncluster.h: the C API of syncluster, Node.js's cluster module rebuilt
 * on raw Linux syscalls (https://crates.io/crates/syncluster).
 *
 * One program runs as the PRIMARY or as a WORKER. The primary forks and
 * execs copies of the program as workers, owns every listening socket, and
 * either hands each accepted connection to a worker in turn (round robin:
 * the fd crosses a socketpair with SCM_RIGHTS) or shares the listening
 * socket with the workers. Primary and workers exchange messages, with fds.
 *
 *     sc_primary *p; sc_worker *w;
 *     int role = sc_role(&p, &w);          // once, at the top of main()
 *     if (role == SC_ROLE_PRIMARY) ...     // fork workers, run events
 *     else if (role == SC_ROLE_WORKER) ... // listen, accept, serve
 *     else fprintf(stderr, "%s\n", sc_last_error_message());
 *
 * CONVENTIONS (as libuv and sd-daemon)
 * - Functions return 0 (or a count, or 1 = "an event was filled in") on
 *   success and a negative errno on failure: -EINVAL for a NULL pointer,
 *   a bad length, a bad flag or a value out of range; the errno of the
 *   system call otherwise. sc_strerror() names it; sc_last_error_message()
 *   gives the detail (the address, the field, the step that failed).
 * - Handles (sc_primary, sc_worker, sc_listener, sc_supervisor) are opaque,
 *   created and freed by the library. Passing a freed handle is undefined
 *   behaviour; passing NULL gives -EINVAL (the *_free functions ignore it).
 * - Structs the caller allocates (sc_event, sc_worker_info,
 *   sc_supervisor_config) start with `size_t size`: set it with the
 *   *_INIT macro, so a later library that adds fields at the end keeps
 *   working with programs built against this header.
 * - Nothing unwinds across the boundary: a bug inside the library (a
 *   caught Rust panic) returns -ENOTRECOVERABLE with a message.
 *
 * FILE DESCRIPTORS
 * - Every fd the library creates is close-on-exec, and stays so when it is
 *   handed to the program (accepted connections, fds received in messages).
 * - fds the program PASSES (sc_primary_send, sc_worker_send) are borrowed:
 *   the library duplicates what it must keep; the program keeps and closes
 *   its own.
 * - fds the library GIVES (sc_listener_accept, sc_event.fd, sc_event.fds)
 *   belong to the program once taken: sc_listener_accept's fd at once; an
 *   event's fds when the program sets the slot to -1 (`int c = ev.fd;
 *   ev.fd = -1;`). sc_event_clear() closes every fd not taken.
 * - fds the library READS OUT (sc_primary_fd, sc_worker_fd) stay the
 *   library's: poll them, never read from or close them.
 *
 * THREADS AND FORK
 * - No handle is thread-safe: use each from one thread at a time. A primary
 *   blocks the signals it reports (SIGCHLD, SIGTERM, SIGINT, SIGHUP,
 *   SIGQUIT, SIGTTIN, SIGTTOU, SIGUSR2) in the thread that creates it: call
 *   sc_role() before starting threads, so that no thread takes them.
 *   sc_strerror, sc_last_error_message (per thread) and the version
 *   functions may be called from any thread.
 * - A child the program forks by itself must not use any handle: it may
 *   only exec or _exit. Workers are started by sc_primary_fork (fork +
 *   exec, with only fds 0, 1, 2 and the worker's channel kept across exec).
 *
 * LINKING
 *   static:  cc app.c -Iinclude target/release/libsyncluster.a -lpthread -ldl -lm -lrt -lutil
 *   shared:  cc app.c $(pkg-config --cflags --libs syncluster)
 *   (scripts/build_c.sh builds both and writes target/c/syncluster.pc.)
 */
#ifndef SYNCLUSTER_H
#define SYNCLUSTER_H

#include <stddef.h>
#include <stdint.h>

#define SYNCLUSTER_VERSION_MAJOR 0
#define SYNCLUSTER_VERSION_MINOR 1
#define SYNCLUSTER_VERSION_PATCH 0
/* "0.1.0" */
#define SYNCLUSTER_VERSION_STRING "0.1.0"
/* (major << 16) | (minor << 8) | patch, as syncluster_version() returns. */
#define SYNCLUSTER_VERSION                                                    \
    ((SYNCLUSTER_VERSION_MAJOR << 16) | (SYNCLUSTER_VERSION_MINOR << 8) |     \
     SYNCLUSTER_VERSION_PATCH)

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ types */

/* The primary process's handle: settings, workers, events. */
typedef struct sc_primary sc_primary;
/* A worker process's handle on the cluster. */
typedef struct sc_worker sc_worker;
/* A listener a worker obtained through the primary. */
typedef struct sc_listener sc_listener;
/* A supervisor running a primary (only inside sc_supervisor_run). */
typedef struct sc_supervisor sc_supervisor;

/* What sc_role() decided. */
typedef enum sc_role_kind {
    SC_ROLE_PRIMARY = 1,
    SC_ROLE_WORKER = 2
} sc_role_kind;

/* How connections reach workers. */
typedef enum sc_policy {
    /* The primary accepts and hands connections out in turn (default). */
    SC_POLICY_RR = 1,
    /* The workers accept on one shared listening socket. */
    SC_POLICY_SHARED = 2
} sc_policy;

/* Presets for sc_primary_listen_rules(). */
typedef enum sc_listen_preset {
    /* Anywhere, unless uid or gid is set: then SC_LISTEN_UNPRIVILEGED. */
    SC_LISTEN_DEFAULT = 0,
    /* Nowhere, until sc_primary_listen_allow_* add places. */
    SC_LISTEN_NOTHING = 1,
    /* Any TCP address and port, any Unix path (Node's rule). */
    SC_LISTEN_ANY = 2,
    /* TCP ports from 1024 up and port 0 on any address; no Unix path. */
    SC_LISTEN_UNPRIVILEGED = 3
} sc_listen_preset;

/* A worker's state (sc_worker_info.state), as Node names them. */
typedef enum sc_worker_state {
    SC_STATE_NONE = 0,         /* forked, no frame yet */
    SC_STATE_ONLINE = 1,       /* its first frame arrived */
    SC_STATE_LISTENING = 2,    /* at least one listener is up */
    SC_STATE_DISCONNECTED = 3, /* its channel is closed */
    SC_STATE_DEAD = 4          /* its process ended */
} sc_worker_state;

/* sc_event.kind. Later versions add kinds: keep a `default:` branch. */
typedef enum sc_event_kind {
    SC_EVENT_NONE = 0, /* an empty (initialised or cleared) event */

    /* From sc_primary_next_event (and the supervisor's callback). */
    SC_EVENT_FORK = 1,       /* id: a worker was forked (its exec succeeded) */
    SC_EVENT_ONLINE = 2,     /* id: its first frame arrived */
    SC_EVENT_LISTENING = 3,  /* id listens on text ("127.0.0.1:8000", "[::1]:80", a path) */
    SC_EVENT_MESSAGE = 4,    /* id sent data/len with fds/nfds (worker: from the primary) */
    SC_EVENT_DISCONNECT = 5, /* id's channel closed (worker: the primary asks it to stop) */
    SC_EVENT_EXIT = 6,       /* id ended: exit_code or term_signal, after_disconnect; its last event */
    SC_EVENT_SIGNAL = 7,     /* the primary received signal (SIGTERM, SIGHUP...): act on it */
    SC_EVENT_ERROR = 8,      /* id misbehaved (it is killed) or an fd was lost: error, text */
    SC_EVENT_HUNG = 9,       /* id held connections past the hang timeout; it is killed */

    /* From sc_worker_next_event. */
    SC_EVENT_CONNECTION = 20, /* a connection on listener: fd */

    /* From the supervisor (sc_supervisor_run's callback). */
    SC_EVENT_READY = 40,         /* every first worker listens (or is online) */
    SC_EVENT_RESPAWNING = 41,    /* id died; a replacement in delay_ms; count deaths in a row */
    SC_EVENT_RESPAWNED = 42,     /* id: the replacement was forked */
    SC_EVENT_CRASH_LOOP = 43,    /* count deaths in a row: the backoff is at its limit */
    SC_EVENT_RELOADING = 44,     /* SIGHUP: a rolling restart began */
    SC_EVENT_REPLACED = 45,      /* old worker id was replaced by new_id */
    SC_EVENT_RELOADED = 46,      /* the rolling restart finished */
    SC_EVENT_RELOAD_FAILED = 47, /* text: why; the old workers stay */
    SC_EVENT_SCALED = 48,        /* SIGTTIN/SIGTTOU: count workers now */
    SC_EVENT_SCALE_REFUSED = 49, /* error, text: why one more worker was refused */
    SC_EVENT_STOPPING = 50,      /* a stop began; graceful is 0 for SIGQUIT */
    SC_EVENT_FORCE_KILLED = 51,  /* ids/nids: killed at the graceful timeout */

    /* Something this version of the API has no kind for: text describes it. */
    SC_EVENT_OTHER = 1000
} sc_event_kind;

/* An event, filled in by the *_next_event functions, sc_worker_recv and the
 * supervisor. Initialise it once with SC_EVENT_INIT (or sc_event_init).
 *
 * OWNERSHIP. The event owns what its pointers point to (text, data, fds,
 * ids) and the fds in fd and fds[]: they stay valid until the event is
 * cleared, which happens on sc_event_clear() and at the start of every call
 * that fills it (so one sc_event may be reused in a loop: clear it once
 * after the last call). To keep an fd, copy it and set its slot to -1; to
 * keep bytes or text, copy them. Do not change the pointers or lengths.
 *
 * Fields that do not apply to a kind are 0, NULL, or -1 for fds. */
typedef struct sc_event {
    size_t size;       /* sizeof(sc_event), set by SC_EVENT_INIT */
    void *internal_;   /* the library's; NULL when the event holds nothing */
    int kind;          /* an sc_event_kind */
    uint32_t id;       /* the worker concerned (0: none or in a worker) */
    int exit_code;     /* EXIT: the exit code, or -1 when a signal ended it */
    int term_signal;   /* EXIT: the signal that ended it, or 0 */
    int after_disconnect; /* EXIT: 1 when a disconnect was asked for first */
    int signal;        /* SIGNAL: the signal number */
    int error;         /* ERROR, SCALE_REFUSED: a negative errno */
    int graceful;      /* STOPPING: 1 graceful (SIGTERM), 0 immediate (SIGQUIT) */
    int fd;            /* CONNECTION: the connected socket (owned, see above); else -1 */
    uint32_t listener; /* CONNECTION: the sc_listener_id() it came to */
    uint32_t new_id;   /* REPLACED: the replacement (id is the old worker) */
    uint32_t count;    /* RESPAWNING, CRASH_LOOP: deaths in a row; SCALED: workers */
    uint64_t delay_ms; /* RESPAWNING: the wait before the fork */
    const char *text;  /* NUL-terminated: LISTENING's address; ERROR's, RELOAD_FAILED's,
                          SCALE_REFUSED's and OTHER's description; else NULL */
    const uint8_t *data; /* MESSAGE: the bytes (NULL when len is 0) */
    size_t len;
    int *fds;          /* MESSAGE: the fds that came with it (owned, see above) */
    size_t nfds;
    const uint32_t *ids; /* FORCE_KILLED: the workers killed */
    size_t nids;
} sc_event;

#define SC_EVENT_INIT                                                        \
    { sizeof(sc_event), NULL, 0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, NULL,  \
      NULL, 0, NULL, 0, NULL, 0 }

/* A worker as sc_primary_worker_info() describes it. */
typedef struct sc_worker_info {
    size_t size;          /* sizeof(sc_worker_info), set by SC_WORKER_INFO_INIT */
    uint32_t id;          /* worker id: 1, 2, 3, ... never reused */
    int32_t pid;          /* its process id */
    int state;            /* an sc_worker_state */
    int after_disconnect; /* 1 once a disconnect was asked for, by either side */
    size_t in_flight;     /* connections handed to it and not yet accepted */
} sc_worker_info;

#define SC_WORKER_INFO_INIT { sizeof(sc_worker_info), 0, 0, 0, 0, 0 }

/* The supervisor's timings and sizes. 0 in a field means its default. */
typedef struct sc_supervisor_config {
    size_t size;                 /* sizeof(sc_supervisor_config) */
    uint32_t workers;            /* workers to keep running (default 1) */
    uint32_t graceful_timeout_ms; /* SIGTERM: wait this long, then SIGKILL (30000) */
    uint32_t backoff_initial_ms; /* first respawn delay after a rapid death (100) */
    uint32_t backoff_max_ms;     /* largest respawn delay (30000) */
    uint32_t stable_after_ms;    /* uptime that resets the backoff (10000) */
    uint32_t reload_timeout_ms;  /* SIGHUP: wait this long for a replacement to listen (30000) */
    uint32_t hang_timeout_ms;    /* kill a worker holding connections this long
                                    without taking the next one (default: off) */
} sc_supervisor_config;

#define SC_SUPERVISOR_CONFIG_INIT { sizeof(sc_supervisor_config), 0, 0, 0, 0, 0, 0, 0 }

/* ------------------------------------------------------ version, errors */

/* SYNCLUSTER_VERSION of the library linked in (compare with the macro to
 * detect a header/library mismatch). Any thread. */
unsigned int syncluster_version(void);

/* "0.1.0": SYNCLUSTER_VERSION_STRING of the library linked in. Static. */
const char *syncluster_version_string(void);

/* A static description of a negative errno as the functions return it
 * ("Invalid argument" for -EINVAL); 0 gives "Success"; a positive value is
 * read as an errno too. Never NULL; valid for the life of the process; any
 * thread. */
const char *sc_strerror(int err);

/* The full message of the last failure in this thread, such as
 * "sc_worker_listen: listen on 127.0.0.1:80: Permission denied (os error
 * 13)"; "" if nothing failed yet. Valid until the next failing call in this
 * thread; successful calls leave it alone. Never NULL. */
const char *sc_last_error_message(void);

/* ------------------------------------------------------------------ role */

/* Decides this process's role, once per process (as Node's
 * cluster.isPrimary). A process is a worker when a primary started it
 * (SYNCLUSTER_WORKER_ID and SYNCLUSTER_CHANNEL_FD are set for it); then it
 * adopts its channel and tells the primary it is online. Otherwise it is
 * the primary, with default settings (policy from SYNCLUSTER_SCHED_POLICY,
 * window from SYNCLUSTER_RR_WINDOW when set).
 *
 * Returns SC_ROLE_PRIMARY and sets *primary (and *worker = NULL), or
 * SC_ROLE_WORKER and sets *worker (and *primary = NULL). Errors: -EINVAL
 * for NULL pointers or a malformed variable (the message names it),
 * -EEXIST on a second call in the same process. The handle is the
 * caller's: free it with sc_primary_free / sc_worker_free. */
int sc_role(sc_primary **primary, sc_worker **worker);

/* ----------------------------------------------------------- the primary */

/* Frees the primary: removes the Unix socket files it bound and restores
 * the signal mask it found. Workers are not killed: they see their channel
 * close and leave. NULL is ignored. */
void sc_primary_free(sc_primary *primary);

/* Settings for FUTURE forks (like Node's cluster.setupPrimary). Each returns
 * 0, or -EINVAL (with a message naming the field) for a NULL handle or an
 * out-of-range value, which is then not applied. Strings are copied. */

/* The program to exec; NULL: this program (/proc/self/exe, the default). */
int sc_primary_set_exec(sc_primary *primary, const char *path);
/* The arguments after argv[0] (argv[0] stays the primary's own). args NULL:
 * the primary's own arguments (the default); n 0 with args not NULL: none. */
int sc_primary_set_args(sc_primary *primary, const char *const *args, size_t n);
/* Sets one extra environment variable for every worker; value NULL removes
 * it from the extras. name must be non-empty and hold no '='. */
int sc_primary_set_env(sc_primary *primary, const char *name, const char *value);
/* The workers' working directory; NULL: inherit the primary's (default). */
int sc_primary_set_cwd(sc_primary *primary, const char *dir);
/* Runs workers as uid/gid with no supplementary groups. */
int sc_primary_set_ids(sc_primary *primary, uint32_t uid, uint32_t gid);
/* Runs workers as `user` (a name, or a uid with a passwd entry) in `group`
 * (a name or a gid; NULL: the user's group) with the user's supplementary
 * groups, resolved now. -EINVAL for an unknown user or group. */
int sc_primary_set_user(sc_primary *primary, const char *user, const char *group);
/* Workers keep the primary's uid and gid again (the default). */
int sc_primary_clear_user(sc_primary *primary);
/* SC_POLICY_RR or SC_POLICY_SHARED. */
int sc_primary_set_policy(sc_primary *primary, int policy);
/* The policy future listens use: SC_POLICY_RR or SC_POLICY_SHARED, or
 * -EINVAL for a NULL handle. */
int sc_primary_policy(const sc_primary *primary);
/* Round robin: connections handed to one worker and not yet taken, 1 to 253
 * (default 4). */
int sc_primary_set_window(sc_primary *primary, size_t window);
/* listen(2) backlog when a worker asks for none, 1 to 2^31-1 (default 511). */
int sc_primary_set_backlog(sc_primary *primary, uint32_t backlog);
/* Replaces where workers may listen by a preset (an sc_listen_preset).
 * A request outside the rules fails the worker's sc_worker_listen with
 * -EACCES naming the address; the worker is not killed. */
int sc_primary_listen_rules(sc_primary *primary, int preset);
/* Also allows TCP ports first..last on host (an IP address; NULL: every
 * address). With the SC_LISTEN_DEFAULT preset in force, starts from
 * SC_LISTEN_NOTHING: only what is allowed explicitly is then allowed. */
int sc_primary_listen_allow_tcp(sc_primary *primary, const char *host,
                                uint16_t first, uint16_t last);
/* Also allows Unix sockets in dir or below it (symlinks resolved). Same
 * starting point as sc_primary_listen_allow_tcp. */
int sc_primary_listen_allow_unix_dir(sc_primary *primary, const char *dir);

/* Forks and execs a worker (like cluster.fork()). Returns 0 once exec has
 * succeeded, with the new worker's id in *id (id may be NULL); an exec or
 * setup failure is the negative errno (-ENOENT for a missing program) with
 * the step that failed in the message. An SC_EVENT_FORK event follows. */
int sc_primary_fork(sc_primary *primary, uint32_t *id);
/* sc_primary_fork with n extra "NAME=VALUE" variables for this worker. */
int sc_primary_fork_env(sc_primary *primary, const char *const *env, size_t n,
                        uint32_t *id);

/* Runs the primary's loop until there is an event, and fills *ev (cleared
 * first). timeout_ms -1: wait as long as it takes; >= 0: at most that long.
 * Returns 1 with an event; 0 when the timeout passed, or (timeout_ms -1)
 * when no worker is left and nothing is pending: the cluster is over; a
 * negative errno on failure (-EBUSY inside sc_supervisor_run). */
int sc_primary_next_event(sc_primary *primary, int timeout_ms, sc_event *ev);

/* The non-blocking step, for a primary driven by the program's own loop
 * (epoll, libuv, libevent): processes what is ready now and fills *ev.
 * Returns 1 with an event, 0 when nothing is left. Call it until 0 whenever
 * sc_primary_fd() is readable or sc_primary_poll_timeout() has passed. */
int sc_primary_try_next_event(sc_primary *primary, sc_event *ev);

/* The primary's epoll fd, readable whenever sc_primary_try_next_event has
 * work. The library's: poll it, do not read or close it. -EINVAL for NULL. */
int sc_primary_fd(const sc_primary *primary);

/* How long the program's loop may wait for sc_primary_fd() before calling
 * sc_primary_try_next_event anyway, in milliseconds rounded up; -1 when
 * only the fd matters. */
int sc_primary_poll_timeout(const sc_primary *primary);

/* Sends a message of len bytes with nfds fds (up to 253) to worker id. The
 * fds are borrowed (duplicated if they must wait). Buffered: never blocks.
 * -ENOTCONN once its channel is closed; -EINVAL over 16 MiB; -EBADF for an
 * fd that is not open; -ENOMEM when the worker does not read (it is then
 * reported and killed). */
int sc_primary_send(sc_primary *primary, uint32_t id, const void *data,
                    size_t len, const int *fds, size_t nfds);

/* Sends signal sig to worker id. -ENOTCONN once it has exited. */
int sc_primary_kill(sc_primary *primary, uint32_t id, int sig);

/* Graceful disconnect of worker id: no new connections, it finishes what
 * it holds and exits; with timeout_ms >= 0, SIGKILL if it is still alive
 * then (-1: no timeout). Its EXIT has after_disconnect 1. */
int sc_primary_disconnect(sc_primary *primary, uint32_t id, int timeout_ms);

/* Stops accepting and disconnects every worker (like cluster.disconnect()).
 * Connections already in the kernel's backlog are handed out first. */
int sc_primary_disconnect_all(sc_primary *primary, int timeout_ms);

/* The ids of the workers (until their EXIT event is out), in order: writes
 * up to cap of them to ids and returns how many there are (which may be
 * more than cap: call again with more room). ids may be NULL if cap is 0. */
int sc_primary_worker_ids(const sc_primary *primary, uint32_t *ids, size_t cap);

/* Fills *info (initialised with SC_WORKER_INFO_INIT) for worker id. 0, or
 * -ENOENT when there is no such worker (any more). */
int sc_primary_worker_info(const sc_primary *primary, uint32_t id,
                           sc_worker_info *info);

/* ------------------------------------------------------------ the worker */

/* Frees the worker handle. Its listeners may be freed before or after. */
void sc_worker_free(sc_worker *worker);

/* This worker's id (1, 2, 3, ...); 0 for NULL. */
uint32_t sc_worker_id(const sc_worker *worker);

/* Ignores SIGINT and SIGTERM in this worker and arms SIGKILL on the
 * primary's death, so that a Ctrl-C to the process group or a service
 * manager's SIGTERM lets the primary stop the workers gracefully.
 * -EPIPE when the primary is already gone. */
int sc_worker_leave_stop_signals_to_primary(sc_worker *worker);

/* Listens through the primary (like server.listen in a Node worker) on
 * "host:port", "[v6]:port", a port alone (every address) or a Unix socket
 * path (anything with a '/'). Blocks for the primary's answer. backlog 0:
 * the primary's default. Port 0 picks a free port, the same for every
 * worker's k-th listen of that address. Fills *listener (free it with
 * sc_listener_close). Errors name the address: -EADDRINUSE, -EACCES (the
 * listen rules), -ECONNABORTED (the worker is disconnecting)... */
int sc_worker_listen(sc_worker *worker, const char *addr, int backlog,
                     sc_listener **listener);

/* Options of sc_worker_listen_with, or-ed together. */
enum {
    /* TCP_DEFER_ACCEPT on the listening socket (nginx's `listen ...
     * deferred`): a connection is accepted (by the primary in round robin,
     * by the worker otherwise) only once its first bytes arrived; one that
     * sends nothing waits in the kernel (about 5 s). TCP addresses only
     * (-EINVAL otherwise). The socket every worker of that address shares
     * keeps it once one worker asked. */
    SC_OPT_DEFER_ACCEPT = 1,
    /* Connections from sc_listener_accept and CONNECTION events come with
     * O_NONBLOCK set: no fcntl per connection for a worker serving them
     * from a poll loop. This worker's listener only. */
    SC_OPT_NONBLOCKING_CONNECTIONS = 2
};

/* sc_worker_listen with SC_OPT_* flags (0: the same as sc_worker_listen).
 * Unknown bits: -EINVAL. Thread and fork safety as sc_worker_listen. */
int sc_worker_listen_with(sc_worker *worker, const char *addr, int backlog,
                          unsigned flags, sc_listener **listener);

/* Waits for the next event: a connection on any listener (CONNECTION, with
 * the listener's id), a message (MESSAGE), the disconnect request
 * (DISCONNECT, once). timeout_ms -1 waits as long as it takes. Fills *ev
 * (cleared first). Returns 1 with an event, 0 when the timeout passed. */
int sc_worker_next_event(sc_worker *worker, int timeout_ms, sc_event *ev);

/* The non-blocking step, for a worker inside the program's own loop
 * (libuv, libevent, epoll): returns 1 with an event, 0 when nothing is
 * ready. Call it until 0 whenever sc_worker_fd() is readable or
 * sc_worker_poll_timeout() has passed. */
int sc_worker_try_next_event(sc_worker *worker, sc_event *ev);

/* The worker's epoll fd, readable whenever sc_worker_try_next_event or a
 * non-blocking sc_listener_accept has something to do (level-triggered).
 * The library's: poll it (uv_poll_init, epoll, poll), never read or close
 * it. Frames already read do not make it readable: drain the step until
 * it returns 0 before waiting. */
int sc_worker_fd(const sc_worker *worker);

/* Milliseconds (rounded up) the loop may wait for sc_worker_fd(), valid
 * once sc_worker_try_next_event returned 0; -1: only the fd matters. */
int sc_worker_poll_timeout(const sc_worker *worker);

/* Sends a message to the primary with nfds borrowed fds (up to 253), which
 * the primary receives as its own close-on-exec duplicates. Blocks until
 * written. -ENOTCONN after a disconnect. */
int sc_worker_send(sc_worker *worker, const void *data, size_t len,
                   const int *fds, size_t nfds);

/* Blocks for the next message from the primary and fills *ev with it
 * (kind SC_EVENT_MESSAGE). Returns 1 with a message, 0 once a disconnect
 * was asked for (or the primary died). Connections arriving meanwhile wait
 * for their listener; other events wait for sc_worker_next_event. */
int sc_worker_recv(sc_worker *worker, sc_event *ev);

/* Leaves the cluster (like cluster.worker.disconnect()): tells the primary,
 * stops listening, leaves round-robin connections not yet taken to the
 * primary (which reads them back and hands them to other workers), and
 * closes the channel. Connections already taken stay open. */
int sc_worker_disconnect(sc_worker *worker);

/* 1 once the primary asked for a disconnect or died, or this worker called
 * sc_worker_disconnect; else 0. -EINVAL for NULL. */
int sc_worker_is_disconnecting(const sc_worker *worker);

/* ---------------------------------------------------------- a listener */

/* Closes the listener: the primary stops routing to this worker for its
 * address; connections handed over and not taken go to another worker.
 * NULL is ignored. */
void sc_listener_close(sc_listener *listener);

/* The id sc_event.listener names for this listener's connections. */
uint32_t sc_listener_id(const sc_listener *listener);

/* Waits for the next connection and stores it in *fd: a plain connected,
 * blocking, close-on-exec socket the caller owns (and closes); a client
 * that reset it meanwhile shows as EOF or ECONNRESET on it. Returns 0;
 * -ECONNABORTED once the worker is disconnecting and the connections
 * already handed over were taken; -EAGAIN in non-blocking mode when none
 * is ready. Other events that arrive meanwhile wait for
 * sc_worker_next_event. */
int sc_listener_accept(sc_listener *listener, int *fd);

/* nonblocking 1: sc_listener_accept returns -EAGAIN instead of waiting
 * (wait for sc_worker_fd between calls); 0: it blocks (the default). */
int sc_listener_set_nonblocking(sc_listener *listener, int nonblocking);

/* ---------------------------------------------------------- the events */

/* Sets *ev to SC_EVENT_INIT. */
void sc_event_init(sc_event *ev);

/* Frees what the event holds, closes the fds the program did not take
 * (those not set to -1) and resets it to an empty event. An empty or
 * already cleared event is left as it is; NULL is ignored. */
void sc_event_clear(sc_event *ev);

/* "rr" or "shared"; NULL for anything else. */
const char *sc_policy_name(int policy);

/* SC_POLICY_RR for "rr" (or "round-robin"), SC_POLICY_SHARED for "shared"
 * (or Node's "none"), else -EINVAL. */
int sc_policy_parse(const char *name);

/* ------------------------------------------------------ the supervisor */

/* Called for each thing the supervisor reports. ev is valid during the
 * call only; to keep an fd of a MESSAGE, copy it and set its slot to -1.
 * The callback runs on the thread that called sc_supervisor_run. It must
 * not unwind (C++ exceptions, longjmp) and may call only: sc_supervisor_stop,
 * sc_supervisor_reload, sc_supervisor_target, sc_supervisor_primary, and on
 * that primary anything but sc_primary_next_event, sc_primary_try_next_event
 * and sc_primary_free (which return -EBUSY or do nothing there). */
typedef void (*sc_notice_cb)(sc_supervisor *supervisor, sc_event *ev,
                             void *user);

/* Runs the nginx-like master on `primary` until it stops:
 *   SIGTERM, SIGINT   graceful stop: stop accepting, workers finish what they
 *                     hold, then exit; SIGKILL after the graceful timeout
 *   SIGQUIT           immediate stop (SIGKILL every worker)
 *   SIGHUP            zero-downtime rolling restart, one worker at a time
 *   SIGTTIN, SIGTTOU  one worker more / fewer (never below 1)
 *   a worker dies     respawned with exponential backoff
 * Forks config->workers workers first (config NULL: the defaults).
 *
 * TAKES primary: it is freed when this returns, whatever the result. cb
 * (which may be NULL) sees every event of the primary and every action of
 * the supervisor. Returns 0 once a stop finished (every worker exited).
 * Errors: -EINVAL (bad arguments, or a worker count the machine cannot
 * hold), returned before any callback; a fork failure; or the startup
 * failed: a first worker ended before it listened (its port is taken...):
 * the others are killed, their exits reported, then the error returned. */
int sc_supervisor_run(sc_primary *primary, const sc_supervisor_config *config,
                      sc_notice_cb cb, void *user);

/* Begins a graceful stop, as SIGTERM does. Only inside the callback. */
int sc_supervisor_stop(sc_supervisor *supervisor);

/* Begins a rolling restart, as SIGHUP does. Only inside the callback. */
int sc_supervisor_reload(sc_supervisor *supervisor);

/* Workers the supervisor keeps running now; -EINVAL for NULL. */
int sc_supervisor_target(const sc_supervisor *supervisor);

/* The primary it runs, for sc_primary_send, _kill, _worker_ids and the
 * settings; valid during the callback; not to be freed. NULL for NULL. */
sc_primary *sc_supervisor_primary(sc_supervisor *supervisor);

#ifdef __cplusplus
}
#endif

#endif /* SYNCLUSTER_H */
