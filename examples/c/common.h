/* What examples/c/hello.c and examples/c/uv_worker.c share: the command
 * line (the contract of examples/hello.rs), the served counts, and just
 * enough HTTP/1.1 to answer "hello world" with the same bytes as
 * examples/common/http.rs. Header-only: each example is one translation
 * unit. */
#ifndef SYNCLUSTER_EXAMPLE_COMMON_H
#define SYNCLUSTER_EXAMPLE_COMMON_H

#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "syncluster.h"

/* Exit status of a worker that could not listen: starting more is futile. */
#define EXIT_LISTEN_FAILED 3

/* ------------------------------------------------------------ options */

struct options {
    long workers;
    char host[128];
    long port;
    int policy;            /* 0: keep what SYNCLUSTER_SCHED_POLICY says */
    int deferred;          /* --deferred: SC_OPT_DEFER_ACCEPT */
    long read_timeout_ms;  /* HELLO_READ_TIMEOUT_MS, default 10000 */
    long hang_timeout_ms;  /* HELLO_HANG_TIMEOUT_MS, default 0 (off) */
};

static inline void usage(FILE *to, const char *prog) {
    fprintf(to,
            "usage: %s [--workers N] [--host H] [--port P] [--policy rr|shared] [--deferred]\n"
            "\n"
            "  --workers N     worker processes (default: the number of CPUs)\n"
            "  --host H        address to listen on (default: 127.0.0.1)\n"
            "  --port P        port, 0 for any free one (default: 8000)\n"
            "  --policy P      rr: the primary accepts and hands connections out in turn;\n"
            "                  shared: workers accept on a shared socket\n"
            "                  (default: $SYNCLUSTER_SCHED_POLICY, else rr)\n"
            "  --deferred      TCP_DEFER_ACCEPT: a connection is accepted once its request\n"
            "                  arrived (nginx's `deferred`)\n"
            "\n"
            "environment: HELLO_READ_TIMEOUT_MS  idle / header read timeout (default 10000)\n"
            "             HELLO_HANG_TIMEOUT_MS  kill a worker that holds connections this long\n"
            "                                    without taking the next one (default off)\n",
            prog);
}

/* A decimal number in [min, max], or -1. */
static inline long parse_num(const char *s, long min, long max) {
    char *end;
    if (!s || !*s) return -1;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v < min || v > max) return -1;
    return v;
}

static inline int env_ms(const char *name, long dflt, long *out, char *why, size_t n) {
    const char *v = getenv(name);
    *out = dflt;
    if (!v) return 0;
    if ((*out = parse_num(v, 1, 86400000L)) < 0) {
        snprintf(why, n, "%s=\"%s\": expected milliseconds above 0", name, v);
        return -1;
    }
    return 0;
}

/* 0: go on; 1: --help; -1: bad arguments (why says which). Workers get the
 * primary's arguments and parse them the same way. */
static inline int parse_args(int argc, char **argv, struct options *o, char *why, size_t n) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    o->workers = cpus > 0 ? cpus : 1;
    strcpy(o->host, "127.0.0.1");
    o->port = 8000;
    o->policy = 0;
    o->deferred = 0;
    if (env_ms("HELLO_READ_TIMEOUT_MS", 10000, &o->read_timeout_ms, why, n) ||
        env_ms("HELLO_HANG_TIMEOUT_MS", 0, &o->hang_timeout_ms, why, n))
        return -1;
    for (int i = 1; i < argc; i++) {
        char flag[32];
        const char *arg = argv[i], *value = NULL, *eq = strchr(arg, '=');
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) return 1;
        if (!strcmp(arg, "--deferred")) {
            o->deferred = 1;
            continue;
        }
        /* Both `--flag value` and `--flag=value`. */
        if (!strncmp(arg, "--", 2) && eq && (size_t)(eq - arg) < sizeof flag) {
            memcpy(flag, arg, (size_t)(eq - arg));
            flag[eq - arg] = 0;
            value = eq + 1;
        } else {
            snprintf(flag, sizeof flag, "%s", arg);
        }
        int known = !strcmp(flag, "--workers") || !strcmp(flag, "--host") ||
                    !strcmp(flag, "--port") || !strcmp(flag, "--policy");
        if (!known) {
            snprintf(why, n, "unknown argument \"%s\"", arg);
            return -1;
        }
        if (!value && !(value = (i + 1 < argc ? argv[++i] : NULL))) {
            snprintf(why, n, "%s needs a value", flag);
            return -1;
        }
        if (!strcmp(flag, "--workers")) {
            if ((o->workers = parse_num(value, 1, 4096)) < 0) {
                snprintf(why, n, "--workers \"%s\": expected a number above 0", value);
                return -1;
            }
        } else if (!strcmp(flag, "--host")) {
            if (strlen(value) >= sizeof o->host) {
                snprintf(why, n, "--host: too long");
                return -1;
            }
            strcpy(o->host, value);
        } else if (!strcmp(flag, "--port")) {
            if ((o->port = parse_num(value, 0, 65535)) < 0) {
                snprintf(why, n, "--port \"%s\": expected 0..65535", value);
                return -1;
            }
        } else if ((o->policy = sc_policy_parse(value)) < 0) {
            snprintf(why, n, "--policy \"%s\": expected rr or shared", value);
            return -1;
        }
    }
    unsigned char ip[16];
    if (!inet_pton(AF_INET, o->host, ip) && !inet_pton(AF_INET6, o->host, ip) &&
        strcmp(o->host, "localhost")) {
        snprintf(why, n, "--host \"%s\": expected an IP address or localhost", o->host);
        return -1;
    }
    return 0;
}

/* host:port as sc_worker_listen takes it; IPv6 needs brackets. */
static inline void listen_addr(const struct options *o, char *out, size_t n) {
    if (strchr(o->host, ':') && o->host[0] != '[')
        snprintf(out, n, "[%s]:%ld", o->host, o->port);
    else
        snprintf(out, n, "%s:%ld", o->host, o->port);
}

/* One line on stdout, flushed at once: scripts wait for it. */
static inline void say(const char *line) {
    fputs(line, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

/* "exit code 3" or "signal SIGKILL (9)", as the Rust ExitStatus prints. */
static inline void exit_text(const sc_event *ev, char *out, size_t n) {
    if (ev->term_signal) {
        const char *abbrev = sigabbrev_np(ev->term_signal);
        snprintf(out, n, "signal SIG%s (%d)", abbrev ? abbrev : "?", ev->term_signal);
    } else {
        snprintf(out, n, "exit code %d", ev->exit_code);
    }
}

/* ------------------------------------------------------ served counts */

/* Connections served, per worker id, as each worker reported it. */
struct served {
    uint32_t *ids;
    unsigned long long *counts;
    size_t n, cap;
};

/* Records a "served N" message from worker id; anything else is ignored. */
static inline void served_record(struct served *s, uint32_t id, const uint8_t *data, size_t len) {
    char text[32];
    if (len < 8 || len >= sizeof text || memcmp(data, "served ", 7)) return;
    memcpy(text, data, len);
    text[len] = 0;
    char *end;
    unsigned long long n = strtoull(text + 7, &end, 10);
    if (*end) return;
    size_t i = 0;
    while (i < s->n && s->ids[i] < id) i++; /* kept sorted by id */
    if (i < s->n && s->ids[i] == id) {
        s->counts[i] = n;
        return;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        uint32_t *ids = (uint32_t *)realloc(s->ids, cap * sizeof *ids);
        if (!ids) return;
        s->ids = ids;
        unsigned long long *counts = (unsigned long long *)realloc(s->counts, cap * sizeof *counts);
        if (!counts) return;
        s->counts = counts;
        s->cap = cap;
    }
    memmove(s->ids + i + 1, s->ids + i, (s->n - i) * sizeof *s->ids);
    memmove(s->counts + i + 1, s->counts + i, (s->n - i) * sizeof *s->counts);
    s->ids[i] = id;
    s->counts[i] = n;
    s->n++;
}

/* Prints `served {"1":N1,"2":N2}` and frees the table. */
static inline void served_print(struct served *s) {
    printf("served {");
    for (size_t i = 0; i < s->n; i++)
        printf("%s\"%u\":%llu", i ? "," : "", (unsigned)s->ids[i], s->counts[i]);
    printf("}\n");
    fflush(stdout);
    free(s->ids);
    free(s->counts);
}

/* --------------------------------------------------------------- HTTP */

#define HELLO_HEAD "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
static const char HELLO_KEEP[] = HELLO_HEAD "Connection: keep-alive\r\n\r\nhello world\n";
static const char HELLO_CLOSE[] = HELLO_HEAD "Connection: close\r\n\r\nhello world\n";
/* HEAD: the same head, no body (12 bytes shorter). */
#define HELLO_BODY_LEN 12

/* Largest request head accepted (431 beyond). */
#define MAX_HEAD 8192

/* A request head, once parsed. */
struct http_req {
    size_t head_len;             /* bytes of the head, blank line included */
    int keep_alive, head_only;
    unsigned long long body;     /* Content-Length: bytes to discard */
    int status;                  /* 0, or the error to answer (400, 431, 501, 505) */
};

static inline int http_token_char(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

static inline const char *http_trim(const char *s, const char *end, const char **tail) {
    while (s < end && (*s == ' ' || *s == '\t')) s++;
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r')) end--;
    *tail = end;
    return s;
}

/* Parses the head at the start of buf: 0 while it is incomplete, else 1
 * with *r filled (r->status set for a bad request). Leading empty lines
 * are skipped (RFC 9112 2.2); a bare LF ends lines too. */
static inline int http_parse(const char *buf, size_t len, struct http_req *r) {
    size_t skip = 0, end = 0;
    while (skip < len && (buf[skip] == '\r' || buf[skip] == '\n')) skip++;
    for (size_t i = skip; i < len; i++) {
        if (buf[i] != '\n') continue;
        if (i + 1 < len && buf[i + 1] == '\n') { end = i + 2; break; }
        if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n') { end = i + 3; break; }
    }
    memset(r, 0, sizeof *r);
    if (!end) {
        if (len > MAX_HEAD) { r->status = 431; r->head_len = len; return 1; }
        return 0;
    }
    r->head_len = end;
    if (end - skip > MAX_HEAD) { r->status = 431; return 1; }
    const char *p = buf + skip, *stop = buf + end;
    /* METHOD SP target SP HTTP/1.x */
    const char *eol = (const char *)memchr(p, '\n', (size_t)(stop - p));
    const char *line_end = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
    const char *sp1 = (const char *)memchr(p, ' ', (size_t)(line_end - p));
    const char *sp2 = sp1 ? (const char *)memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (!sp1 || !sp2 || sp1 == p || sp2 == sp1 + 1 || memchr(sp2 + 1, ' ', (size_t)(line_end - sp2 - 1))) {
        r->status = 400;
        return 1;
    }
    for (const char *c = p; c < sp1; c++)
        if (!http_token_char((unsigned char)*c)) { r->status = 400; return 1; }
    for (const char *c = sp1 + 1; c < sp2; c++)
        if ((unsigned char)*c <= ' ' || *c == 0x7f) { r->status = 400; return 1; }
    size_t vlen = (size_t)(line_end - sp2 - 1);
    const char *v = sp2 + 1;
    int http11;
    if (vlen == 8 && !memcmp(v, "HTTP/1.1", 8)) http11 = 1;
    else if (vlen == 8 && !memcmp(v, "HTTP/1.0", 8)) http11 = 0;
    else if (vlen == 8 && !memcmp(v, "HTTP/", 5) && v[5] >= '0' && v[5] <= '9' && v[6] == '.' &&
             v[7] >= '0' && v[7] <= '9') { r->status = 505; return 1; }
    else { r->status = 400; return 1; }
    r->head_only = sp1 - p == 4 && !memcmp(p, "HEAD", 4);
    int close_it = 0, keep = 0, hosts = 0, have_len = 0;
    for (p = eol + 1; p < stop; p = eol + 1) {
        eol = (const char *)memchr(p, '\n', (size_t)(stop - p));
        const char *le = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
        if (le == p) break; /* the blank line */
        const char *colon = (const char *)memchr(p, ':', (size_t)(le - p));
        if (!colon || colon == p) { r->status = 400; return 1; }
        for (const char *c = p; c < colon; c++)
            if (!http_token_char((unsigned char)*c)) { r->status = 400; return 1; }
        for (const char *c = colon + 1; c < le; c++)
            if (((unsigned char)*c < ' ' && *c != '\t') || *c == 0x7f) { r->status = 400; return 1; }
        size_t nlen = (size_t)(colon - p);
        const char *vend, *val = http_trim(colon + 1, le, &vend);
        if (nlen == 4 && !strncasecmp(p, "host", 4)) {
            hosts++;
        } else if (nlen == 10 && !strncasecmp(p, "connection", 10)) {
            for (const char *o = val; o < vend;) {
                const char *comma = (const char *)memchr(o, ',', (size_t)(vend - o));
                const char *oe = comma ? comma : vend, *te, *t = http_trim(o, oe, &te);
                if (te - t == 5 && !strncasecmp(t, "close", 5)) close_it = 1;
                if (te - t == 10 && !strncasecmp(t, "keep-alive", 10)) keep = 1;
                o = comma ? comma + 1 : vend;
            }
        } else if (nlen == 14 && !strncasecmp(p, "content-length", 14)) {
            unsigned long long n = 0;
            if (val == vend || vend - val > 18) { r->status = 400; return 1; }
            for (const char *c = val; c < vend; c++) {
                if (*c < '0' || *c > '9') { r->status = 400; return 1; }
                n = n * 10 + (unsigned)(*c - '0');
            }
            if (have_len && n != r->body) { r->status = 400; return 1; }
            r->body = n;
            have_len = 1;
        } else if (nlen == 17 && !strncasecmp(p, "transfer-encoding", 17)) {
            r->status = 501; /* chunked bodies are not worth it in a hello world */
            return 1;
        }
    }
    if (hosts > 1 || (http11 && hosts == 0)) { r->status = 400; return 1; }
    /* 1.1 keeps the connection unless told otherwise; 1.0 closes it unless told otherwise. */
    r->keep_alive = !close_it && (http11 || keep);
    return 1;
}

/* The answer to a bad request, with Connection: close, into out. */
static inline size_t http_error(int status, char *out, size_t n) {
    const char *reason = status == 431 ? "Request Header Fields Too Large"
                         : status == 501 ? "Not Implemented"
                         : status == 505 ? "HTTP Version Not Supported"
                                         : "Bad Request";
    int len = snprintf(out, n,
                       "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                       "Connection: close\r\n\r\n%s\n",
                       status, reason, strlen(reason) + 1, reason);
    return len > 0 && (size_t)len < n ? (size_t)len : 0;
}

#endif
