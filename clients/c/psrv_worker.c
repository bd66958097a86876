/* A psrv worker in C, written from docs/protocol.md alone: libzmq and a hand-written msgpack subset.
 *
 *   psrv_worker ADDRESS            (build: make -C clients/c, or the gcc line in clients/c/Makefile)
 *
 * It says hello with wid -1 and local false, rebuilds every shard of a CSV source by the document's rules (no quoted
 * fields; data.test_fraction 0: held-out rows need NumPy's generator; data.batch_order "rows"), checks each against
 * the server's CRC-32, then trains the linear model: pull, gradient of the batch's mean squared error (2 X^T r / m),
 * push with pull true, until the server says stop. Heartbeats go on the same socket while it waits for a reply. Prints "wid W", one
 * "push CLOCK LOSS" line per push and "stop REASON pushes N"; exits 0 on stop, 1 on any failure.
 */
#define _POSIX_C_SOURCE 200809L
#include <zmq.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void die(const char *what, const char *detail) {
    fprintf(stderr, "psrv_worker: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

/* ------------------------------------------------------------------ msgpack: the types the protocol uses */
enum { NIL, BOOL, INT, FLOAT, STR, BIN, ARR, MAP };
typedef struct mp { int t; int64_t i; double f; const char *s; uint32_t n; struct mp *kids; } mp;
/* ARR: n kids; MAP: 2n kids (key, value, ...); STR/BIN: s points into the frame, n bytes */

typedef struct { const uint8_t *p, *end; mp *pool; size_t used, cap; } reader;

static uint64_t be(reader *r, int bytes) {
    if (r->end - r->p < bytes) die("truncated msgpack", NULL);
    uint64_t v = 0;
    for (int k = 0; k < bytes; k++) v = v << 8 | *r->p++;
    return v;
}

static mp *take(reader *r, uint32_t n) {            /* n consecutive nodes from the pool */
    if (r->cap - r->used < n) die("msgpack: too many items", NULL);
    r->used += n;
    return r->pool + r->used - n;
}

static void parse(reader *r, mp *v);

static void items(reader *r, mp *v, int t, uint32_t n) {
    v->t = t, v->n = n;
    uint32_t count = t == MAP ? 2 * n : n;
    v->kids = take(r, count);
    for (uint32_t k = 0; k < count; k++) parse(r, &v->kids[k]);
}

static void bytes_(reader *r, mp *v, int t, uint32_t n) {
    if ((uint64_t)(r->end - r->p) < n) die("truncated msgpack", NULL);
    v->t = t, v->s = (const char *)r->p, v->n = n, r->p += n;
}

static void parse(reader *r, mp *v) {
    uint8_t c = (uint8_t)be(r, 1);
    memset(v, 0, sizeof *v);
    if (c <= 0x7f) { v->t = INT, v->i = c; }
    else if (c >= 0xe0) { v->t = INT, v->i = (int8_t)c; }
    else if ((c & 0xf0) == 0x80) items(r, v, MAP, c & 0x0f);
    else if ((c & 0xf0) == 0x90) items(r, v, ARR, c & 0x0f);
    else if ((c & 0xe0) == 0xa0) bytes_(r, v, STR, c & 0x1f);
    else switch (c) {
        case 0xc0: v->t = NIL; break;
        case 0xc2: case 0xc3: v->t = BOOL, v->i = c == 0xc3; break;
        case 0xc4: bytes_(r, v, BIN, (uint32_t)be(r, 1)); break;
        case 0xc5: bytes_(r, v, BIN, (uint32_t)be(r, 2)); break;
        case 0xc6: bytes_(r, v, BIN, (uint32_t)be(r, 4)); break;
        case 0xca: { uint32_t u = (uint32_t)be(r, 4); float f; memcpy(&f, &u, 4); v->t = FLOAT, v->f = f; break; }
        case 0xcb: { uint64_t u = be(r, 8); memcpy(&v->f, &u, 8); v->t = FLOAT; break; }
        case 0xcc: v->t = INT, v->i = (int64_t)be(r, 1); break;
        case 0xcd: v->t = INT, v->i = (int64_t)be(r, 2); break;
        case 0xce: v->t = INT, v->i = (int64_t)be(r, 4); break;
        case 0xcf: v->t = INT, v->i = (int64_t)be(r, 8); break;
        case 0xd0: v->t = INT, v->i = (int8_t)be(r, 1); break;
        case 0xd1: v->t = INT, v->i = (int16_t)be(r, 2); break;
        case 0xd2: v->t = INT, v->i = (int32_t)be(r, 4); break;
        case 0xd3: v->t = INT, v->i = (int64_t)be(r, 8); break;
        case 0xd9: bytes_(r, v, STR, (uint32_t)be(r, 1)); break;
        case 0xda: bytes_(r, v, STR, (uint32_t)be(r, 2)); break;
        case 0xdb: bytes_(r, v, STR, (uint32_t)be(r, 4)); break;
        case 0xdc: items(r, v, ARR, (uint32_t)be(r, 2)); break;
        case 0xdd: items(r, v, ARR, (uint32_t)be(r, 4)); break;
        case 0xde: items(r, v, MAP, (uint32_t)be(r, 2)); break;
        case 0xdf: items(r, v, MAP, (uint32_t)be(r, 4)); break;
        default: die("msgpack type not used by the protocol", NULL);
    }
}

static mp *get(const mp *m, const char *key) {      /* a map's value for a str key, or NULL */
    if (!m || m->t != MAP) return NULL;
    for (uint32_t k = 0; k < m->n; k++) {
        const mp *kk = &m->kids[2 * k];
        if (kk->t == STR && kk->n == strlen(key) && !memcmp(kk->s, key, kk->n)) return &m->kids[2 * k + 1];
    }
    return NULL;
}

static int64_t num(const mp *m, const char *key) {
    const mp *v = get(m, key);
    if (!v || (v->t != INT && v->t != BOOL)) die("reply lacks integer field", key);
    return v->i;
}

static double real(const mp *m, const char *key) {
    const mp *v = get(m, key);
    if (!v || (v->t != INT && v->t != FLOAT)) die("reply lacks number field", key);
    return v->t == INT ? (double)v->i : v->f;
}

static int is(const mp *v, const char *s) { return v && v->t == STR && v->n == strlen(s) && !memcmp(v->s, s, v->n); }

static char *text(const mp *m, const char *key) {   /* a str field as a C string (malloc) */
    const mp *v = get(m, key);
    if (!v || v->t != STR) die("reply lacks string field", key);
    char *s = malloc(v->n + 1);
    memcpy(s, v->s, v->n), s[v->n] = 0;
    return s;
}

typedef struct { uint8_t b[1024]; size_t n; } writer;

static void put(writer *w, const void *p, size_t n) {
    if (w->n + n > sizeof w->b) die("header too long", NULL);
    memcpy(w->b + w->n, p, n), w->n += n;
}
static void put_be(writer *w, uint8_t tag, uint64_t v, int bytes) {
    put(w, &tag, 1);
    for (int k = bytes - 1; k >= 0; k--) { uint8_t c = (uint8_t)(v >> (8 * k)); put(w, &c, 1); }
}
static void w_map(writer *w, int n) { uint8_t c = (uint8_t)(0x80 | n); put(w, &c, 1); }
static void w_arr(writer *w, int n) { uint8_t c = (uint8_t)(0x90 | n); put(w, &c, 1); }
static void w_str(writer *w, const char *s) { size_t n = strlen(s); put_be(w, 0xd9, n, 1); put(w, s, n); }
static void w_int(writer *w, int64_t i) { put_be(w, 0xd3, (uint64_t)i, 8); }
static void w_f64(writer *w, double f) { uint64_t u; memcpy(&u, &f, 8); put_be(w, 0xcb, u, 8); }
static void w_bool(writer *w, int b) { uint8_t c = b ? 0xc3 : 0xc2; put(w, &c, 1); }
#define KV_INT(w, k, v) (w_str(w, k), w_int(w, v))

/* ------------------------------------------------------------------ the document's arithmetic */
static uint64_t sm(uint64_t x) {                    /* splitmix64's output function */
    uint64_t z = x + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint32_t crc32_(uint32_t crc, const void *data, size_t n) {   /* zlib's CRC-32 */
    const uint8_t *p = data;
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
    }
    return ~crc;
}

typedef struct { uint64_t h; uint32_t pos; } keyed;
static int by_key(const void *a, const void *b) {
    const keyed *x = a, *y = b;
    return x->h != y->h ? (x->h < y->h ? -1 : 1) : (x->pos > y->pos) - (x->pos < y->pos);
}

typedef struct { double *X, *y; int64_t rows; int64_t epoch; uint32_t *order; } shard_t;

/* ------------------------------------------------------------------ the conversation */
static void *sock;
static int64_t rid, wid = -1, inc, seq;
static double hb_interval_s = 0.5, timeout_s = 10.0;
static uint8_t *frames[4];
static size_t sizes[4];
static int nframes;
static mp pool[1 << 16], header;

static double now_s(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static void send_msg(writer *w, const void *array, size_t nbytes) {
    if (zmq_send(sock, w->b, w->n, array ? ZMQ_SNDMORE : 0) < 0) die("send", zmq_strerror(errno));
    if (array && zmq_send(sock, array, nbytes, 0) < 0) die("send", zmq_strerror(errno));
}

static int recv_msg(int timeout_ms) {               /* 1: a message is in frames/header; 0: nothing in time */
    zmq_pollitem_t it = {sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, timeout_ms) <= 0) return 0;
    for (nframes = 0;; nframes++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, 0) < 0) die("recv", zmq_strerror(errno));
        if (nframes < 4) {
            free(frames[nframes]);
            sizes[nframes] = zmq_msg_size(&m);
            frames[nframes] = malloc(sizes[nframes] + 1);
            memcpy(frames[nframes], zmq_msg_data(&m), sizes[nframes]);
        }
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        if (!more) break;
    }
    nframes++;
    reader r = {frames[0], frames[0] + sizes[0], pool, 0, sizeof pool / sizeof *pool};
    parse(&r, &header);
    return 1;
}

static void heartbeat(void) {
    writer w = {.n = 0};
    w_map(&w, 4), w_str(&w, "op"), w_str(&w, "heartbeat"), KV_INT(&w, "wid", wid), KV_INT(&w, "inc", inc);
    KV_INT(&w, "rid", ++rid);
    send_msg(&w, NULL, 0);
}

/* Send a request, then wait for the reply carrying its rid (or a reply with no rid: an error about an unreadable
 * header); heartbeat meanwhile. A reply to a heartbeat that says alive false ends the worker. */
static void request(writer *w, const void *array, size_t nbytes, int64_t my_rid) {
    send_msg(w, array, nbytes);
    double last_word = now_s(), last_beat = now_s();
    for (;;) {
        if (recv_msg(100)) {
            last_word = now_s();
            const mp *r = get(&header, "rid");
            if (!r || r->i == my_rid) {
                if (is(get(&header, "op"), "error")) die(text(&header, "code"), text(&header, "reason"));
                return;
            }
            if (is(get(&header, "op"), "heartbeat") && !num(&header, "alive")) die("declared dead", NULL);
            continue;                               /* a heartbeat's reply, or a late one: not ours */
        }
        if (wid >= 0 && now_s() - last_beat >= hb_interval_s) heartbeat(), last_beat = now_s();
        if (now_s() - last_word > timeout_s) die("no word from the server", NULL);
    }
}

/* ------------------------------------------------------------------ data: a CSV source, by the document's rules */
static char *trim(char *s) {
    while (*s == ' ' || *s == '\t') s++;
    char *e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r' || e[-1] == '\n')) *--e = 0;
    return s;
}

static int64_t read_csv(const char *path, const char *target, int64_t d, double **X, double **y) {
    FILE *f = fopen(path, "r");
    if (!f) die("cannot open", path);
    char line[1 << 16];
    if (!fgets(line, sizeof line, f)) die("empty csv", path);
    int64_t cols = 0, t = -1;
    for (char *tok = strtok(line, ","); tok; tok = strtok(NULL, ","), cols++)
        if (*target && !strcmp(trim(tok), target)) t = cols;
    if (!*target) t = cols - 1;
    if (t < 0 || cols != d + 1) die("csv header does not match welcome (target, d)", path);
    int64_t n = 0, cap = 1024;
    *X = malloc(cap * d * sizeof **X), *y = malloc(cap * sizeof **y);
    while (fgets(line, sizeof line, f)) {
        if (!*trim(line)) continue;                 /* a blank line */
        if (n == cap) cap *= 2, *X = realloc(*X, cap * d * sizeof **X), *y = realloc(*y, cap * sizeof **y);
        int64_t c = 0, j = 0;
        for (char *tok = strtok(line, ","); tok; tok = strtok(NULL, ","), c++) {
            char *end;
            double v = strtod(trim(tok), &end);
            if (*end || c > d) die("csv field is not a number (or a row is too long)", tok);
            if (c == t) (*y)[n] = v; else (*X)[n * d + j++] = v;
        }
        if (c != d + 1) die("csv row with the wrong number of fields", path);
        n++;
    }
    fclose(f);
    return n;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: psrv_worker ADDRESS\n"); return 2; }
    void *ctx = zmq_ctx_new();
    sock = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(sock, argv[1]) < 0) die("connect", zmq_strerror(errno));

    writer w = {.n = 0};
    w_map(&w, 8), w_str(&w, "op"), w_str(&w, "hello"), KV_INT(&w, "version", 1), w_str(&w, "role");
    w_str(&w, "worker"), KV_INT(&w, "wid", -1), KV_INT(&w, "pid", 0), w_str(&w, "host"), w_str(&w, "c-client");
    w_str(&w, "local"), w_bool(&w, 0), KV_INT(&w, "rid", ++rid);
    request(&w, NULL, 0, rid);
    wid = num(&header, "wid"), inc = num(&header, "inc");
    char *sid = text(&header, "server_id");
    const mp *train = get(&header, "train"), *model = get(&header, "model"), *data = get(&header, "data");
    const mp *cfg = get(data, "config"), *shape = get(&header, "theta_shape");
    hb_interval_s = real(train, "heartbeat_interval_s"), timeout_s = real(train, "server_timeout_s");
    int64_t seed = num(train, "seed"), d = num(get(data, "block"), "d"), fit_b = num(model, "fit_intercept");
    if (!is(get(model, "kind"), "linear") || !is(get(&header, "theta_dtype"), "<f8") || shape->n != 1
        || num(train, "local_steps") != 1 || real(cfg, "test_fraction") != 0 || nframes != 3
        || (get(cfg, "batch_order") && !is(get(cfg, "batch_order"), "rows")))
        die("this client does: linear model, float64, no local steps, data.test_fraction 0, batch_order rows", NULL);
    int64_t p = shape->kids[0].i, k = get(data, "shards")->n;
    double *mean = (double *)frames[1], *scale = (double *)frames[2];
    frames[1] = frames[2] = NULL;                   /* keep them: later replies reuse the frame slots */
    printf("wid %lld\n", (long long)wid);

    /* read, partition (range or hash), standardize with welcome's mean and scale, check each shard's CRC-32 */
    double *X, *y;
    char *target = text(cfg, "target"), *source = text(cfg, "source");
    int64_t n = read_csv(source, target, d, &X, &y);
    int hash = is(get(cfg, "partition"), "hash");
    shard_t *sh = calloc(k, sizeof *sh);
    int64_t *owner = malloc(n * sizeof *owner);
    for (int64_t i = 0, s = 0, used = 0; i < n; i++) {
        if (!hash && used == n / k + (s < n % k)) s++, used = 0;
        owner[i] = hash ? (int64_t)(sm((uint64_t)i) % (uint64_t)k) : s;
        used += !hash, sh[owner[i]].rows++;
    }
    for (int64_t s = 0; s < k; s++) {
        sh[s].X = malloc(sh[s].rows * d * sizeof(double)), sh[s].y = malloc(sh[s].rows * sizeof(double));
        sh[s].epoch = -1, sh[s].rows = 0;
    }
    for (int64_t i = 0; i < n; i++) {
        shard_t *s = &sh[owner[i]];
        for (int64_t j = 0; j < d; j++) s->X[s->rows * d + j] = (X[i * d + j] - mean[j]) / scale[j];
        s->y[s->rows++] = y[i];
    }
    const mp *sums = get(data, "checksums");
    for (uint32_t c = 0; c < sums->n; c++) {
        int64_t s = sums->kids[c].kids[0].i;
        uint32_t crc = crc32_(crc32_(0, sh[s].X, sh[s].rows * d * sizeof(double)), sh[s].y, sh[s].rows * sizeof(double));
        if (crc != (uint32_t)sums->kids[c].kids[1].i) die("a shard's checksum differs from the server's", NULL);
    }

    double *g = malloc(p * sizeof *g), *theta = malloc(p * sizeof *theta);
    int64_t pushes = 0;
    w.n = 0;
    w_map(&w, 5), w_str(&w, "op"), w_str(&w, "pull"), KV_INT(&w, "wid", wid), KV_INT(&w, "inc", inc);
    KV_INT(&w, "clock", 0), KV_INT(&w, "rid", ++rid);
    request(&w, NULL, 0, rid);
    int64_t clock = 0;
    for (;;) {
        const mp *op = get(&header, "op");
        if (is(op, "stop")) {
            printf("stop %s pushes %lld\n", text(&header, "reason"), (long long)pushes);
            break;
        }
        if (is(op, "ack")) {                        /* a duplicate's ack: pull the clock after the one pushed */
            w.n = 0;
            w_map(&w, 5), w_str(&w, "op"), w_str(&w, "pull"), KV_INT(&w, "wid", wid), KV_INT(&w, "inc", inc);
            KV_INT(&w, "clock", clock + 1), KV_INT(&w, "rid", ++rid);
            request(&w, NULL, 0, rid);
            continue;
        }
        if (!is(op, "theta") || nframes != 2 || sizes[1] != (size_t)p * sizeof(double)) die("unexpected reply", NULL);
        clock = num(&header, "clock");
        memcpy(theta, frames[1], sizes[1]);
        const mp *b = get(&header, "batch");
        int64_t s = b->kids[0].i, epoch = b->kids[1].i, start = b->kids[2].i, m = b->kids[3].i;
        shard_t *q = &sh[s];
        if (q->epoch != epoch) {                    /* this shard's epoch order: positions by sm(key + pos) */
            uint64_t key = sm(sm(sm((uint64_t)seed) + (uint64_t)s) + (uint64_t)epoch);
            keyed *kd = malloc(q->rows * sizeof *kd);
            for (int64_t i = 0; i < q->rows; i++) kd[i].h = sm(key + (uint64_t)i), kd[i].pos = (uint32_t)i;
            qsort(kd, q->rows, sizeof *kd, by_key);
            free(q->order);
            q->order = malloc(q->rows * sizeof *q->order);
            for (int64_t i = 0; i < q->rows; i++) q->order[i] = kd[i].pos;
            free(kd), q->epoch = epoch;
        }
        double loss = 0;                            /* mean (z - y)^2 and its gradient 2 X^T r / m */
        memset(g, 0, p * sizeof *g);
        for (int64_t i = start; i < start + m; i++) {
            const double *x = q->X + q->order[i] * d;
            double z = fit_b ? theta[d] : 0;
            for (int64_t j = 0; j < d; j++) z += x[j] * theta[j];
            double r = z - q->y[q->order[i]];
            loss += r * r;
            for (int64_t j = 0; j < d; j++) g[j] += 2 * r * x[j] / m;
            if (fit_b) g[d] += 2 * r / m;
        }
        loss /= m;
        w.n = 0;
        w_map(&w, 14), w_str(&w, "op"), w_str(&w, "push"), KV_INT(&w, "wid", wid), KV_INT(&w, "inc", inc);
        w_str(&w, "sid"), w_str(&w, sid), KV_INT(&w, "seq", ++seq), KV_INT(&w, "clock", clock);
        KV_INT(&w, "version", num(&header, "version")), w_str(&w, "loss"), w_f64(&w, loss), KV_INT(&w, "count", m);
        w_str(&w, "pull"), w_bool(&w, 1), w_str(&w, "compute_s"), w_f64(&w, 0), w_str(&w, "request_s");
        w_f64(&w, 0), KV_INT(&w, "rid", ++rid);
        w_str(&w, "arrays"), w_arr(&w, 1), w_arr(&w, 2), w_str(&w, "<f8"), w_arr(&w, 1), w_int(&w, p);
        printf("push %lld %.17g\n", (long long)clock, loss);
        pushes++;
        request(&w, g, p * sizeof *g, rid);
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
