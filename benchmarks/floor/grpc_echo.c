/* grpc_echo: the upstream of the grpc-unary scenarios. A gRPC server over h2c (HTTP/2 with
 * prior knowledge) on libnghttp2, one thread, level-triggered epoll, non-blocking sockets.
 *
 *   POST /bench.Echo/Ping, content-type application/grpc..., body one length-prefixed
 *   message (flag byte 0, 4-byte big-endian length, the message)
 *       -> HEADERS :status 200, content-type application/grpc
 *          DATA    the same length-prefixed message
 *          HEADERS grpc-status 0, grpc-message "" (END_STREAM)
 *   the same with a malformed body (not exactly one uncompressed message)
 *       -> trailers-only: :status 200, content-type, grpc-status 13 (INTERNAL), END_STREAM
 *   another path with a gRPC content-type
 *       -> trailers-only with grpc-status 12 (UNIMPLEMENTED)
 *   GET /stats
 *       -> 200, a JSON object of counters: calls_ok, calls_bad, unimplemented,
 *          connections, streams (the harness compares calls_ok with the load tool's count)
 *   anything else -> 404
 *
 * Usage: grpc_echo PORT   (0: any free port). Prints "READY <port>" once listening.
 * Build: cc -O2 -o grpc_echo grpc_echo.c -lnghttp2
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nghttp2/nghttp2.h>

#define MAX_BODY (16u << 20)          /* a request body above this resets the stream */
#define OUT_HIGH (1u << 20)           /* stop producing frames above this much unsent */

enum { K_NONE, K_PING, K_STATS };

struct stream {
    int kind;
    int grpc;                         /* content-type application/grpc... */
    int post;
    uint8_t *body;
    size_t len, cap, off;             /* request body; off: how much of it went back */
    int trailers;                     /* send grpc-status 0 trailers after the body */
    char stats[256];
};

struct conn {
    int fd;
    nghttp2_session *s;
    uint8_t *out;
    size_t out_len, out_off, out_cap;
    int epollout;
};

static unsigned long long calls_ok, calls_bad, unimplemented, connections, streams;
static int ep;

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1, \
                  NGHTTP2_NV_FLAG_NONE}

static nghttp2_nv H_OK[] = {NV(":status", "200"), NV("content-type", "application/grpc")};
static nghttp2_nv T_OK[] = {NV("grpc-status", "0"), NV("grpc-message", "")};
static nghttp2_nv H_BAD[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                             NV("grpc-status", "13"),
                             NV("grpc-message", "expected one uncompressed length-prefixed message")};
static nghttp2_nv H_UNIMPL[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                                NV("grpc-status", "12"), NV("grpc-message", "unknown method")};
static nghttp2_nv H_STATS[] = {NV(":status", "200"), NV("content-type", "application/json")};
static nghttp2_nv H_404[] = {NV(":status", "404")};
static nghttp2_nv H_415[] = {NV(":status", "415")};

static ssize_t body_read(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *src, void *ud) {
    struct stream *st = src->ptr;
    size_t n = st->len - st->off;
    if (n > length)
        n = length;
    memcpy(buf, st->body + st->off, n);
    st->off += n;
    if (st->off == st->len) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        if (st->trailers) {
            *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
            if (nghttp2_submit_trailer(s, id, T_OK, 2) != 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
    }
    return (ssize_t)n;
}

static int respond(nghttp2_session *s, int32_t id, struct stream *st) {
    nghttp2_data_provider prd = {.source = {.ptr = st}, .read_callback = body_read};
    if (st->kind == K_STATS) {
        int n = snprintf(st->stats, sizeof st->stats,
                         "{\"calls_ok\": %llu, \"calls_bad\": %llu, \"unimplemented\": %llu, "
                         "\"connections\": %llu, \"streams\": %llu}\n",
                         calls_ok, calls_bad, unimplemented, connections, streams);
        free(st->body);
        st->body = (uint8_t *)strdup(st->stats);
        if (st->body == NULL)
            return -1;
        st->len = (size_t)n;
        st->off = 0;
        return nghttp2_submit_response(s, id, H_STATS, 2, &prd);
    }
    if (!st->grpc)
        return nghttp2_submit_response(s, id, st->kind == K_PING ? H_415 : H_404, 1, NULL);
    if (st->kind != K_PING || !st->post) {
        unimplemented++;
        return nghttp2_submit_response(s, id, H_UNIMPL, 4, NULL);
    }
    if (st->len < 5 || st->body[0] != 0 ||
        ((uint32_t)st->body[1] << 24 | (uint32_t)st->body[2] << 16 |
         (uint32_t)st->body[3] << 8 | st->body[4]) != st->len - 5) {
        calls_bad++;
        return nghttp2_submit_response(s, id, H_BAD, 4, NULL);
    }
    calls_ok++;
    st->trailers = 1;
    st->off = 0;
    return nghttp2_submit_response(s, id, H_OK, 2, &prd);
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct stream *st = calloc(1, sizeof *st);
    if (st == NULL)
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    streams++;
    return nghttp2_session_set_stream_user_data(s, f->hd.stream_id, st);
}

static int on_header(nghttp2_session *s, const nghttp2_frame *f, const uint8_t *name,
                     size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                     void *ud) {
    if (f->hd.type != NGHTTP2_HEADERS || f->headers.cat != NGHTTP2_HCAT_REQUEST)
        return 0;
    struct stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st == NULL)
        return 0;
#define IS(lit, p, n) ((n) == sizeof(lit) - 1 && memcmp((p), (lit), (n)) == 0)
    if (IS(":path", name, namelen)) {
        if (IS("/bench.Echo/Ping", value, valuelen))
            st->kind = K_PING;
        else if (IS("/stats", value, valuelen))
            st->kind = K_STATS;
    } else if (IS(":method", name, namelen)) {
        st->post = IS("POST", value, valuelen);
    } else if (IS("content-type", name, namelen)) {
        st->grpc = valuelen >= 16 && memcmp(value, "application/grpc", 16) == 0 &&
                   (valuelen == 16 || value[16] == '+' || value[16] == ';');
    }
    return 0;
}

static int on_data_chunk(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud) {
    struct stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st == NULL)
        return 0;
    if (st->len + len > MAX_BODY)
        return nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, id, NGHTTP2_REFUSED_STREAM);
    if (st->len + len > st->cap) {
        size_t cap = st->cap ? st->cap : 256;
        while (cap < st->len + len)
            cap *= 2;
        uint8_t *b = realloc(st->body, cap);
        if (b == NULL)
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        st->body = b;
        st->cap = cap;
    }
    memcpy(st->body + st->len, data, len);
    st->len += len;
    return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *f, void *ud) {
    if ((f->hd.type != NGHTTP2_DATA && f->hd.type != NGHTTP2_HEADERS) ||
        !(f->hd.flags & NGHTTP2_FLAG_END_STREAM))
        return 0;
    struct stream *st = nghttp2_session_get_stream_user_data(s, f->hd.stream_id);
    if (st == NULL)
        return 0;
    return respond(s, f->hd.stream_id, st) == 0 ? 0 : NGHTTP2_ERR_CALLBACK_FAILURE;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t code, void *ud) {
    struct stream *st = nghttp2_session_get_stream_user_data(s, id);
    if (st != NULL) {
        nghttp2_session_set_stream_user_data(s, id, NULL);
        free(st->body);
        free(st);
    }
    return 0;
}

static nghttp2_session_callbacks *callbacks;

static void conn_close(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    nghttp2_session_del(c->s);
    free(c->out);
    free(c);
}

/* Produce frames into c->out and write what the socket takes. -1: close the connection. */
static int conn_flush(struct conn *c) {
    for (;;) {
        while (c->out_len - c->out_off < OUT_HIGH) {
            const uint8_t *data;
            ssize_t n = nghttp2_session_mem_send(c->s, &data);
            if (n < 0)
                return -1;
            if (n == 0)
                break;
            if (c->out_off == c->out_len)
                c->out_off = c->out_len = 0;
            if (c->out_len + (size_t)n > c->out_cap) {
                size_t cap = c->out_cap ? c->out_cap : 16384;
                while (cap < c->out_len + (size_t)n)
                    cap *= 2;
                uint8_t *b = realloc(c->out, cap);
                if (b == NULL)
                    return -1;
                c->out = b;
                c->out_cap = cap;
            }
            memcpy(c->out + c->out_len, data, (size_t)n);
            c->out_len += (size_t)n;
        }
        if (c->out_off == c->out_len)
            break;
        ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -1;
            break;
        }
        c->out_off += (size_t)w;
        if (c->out_off < c->out_len)
            break;                      /* the socket is full */
        c->out_off = c->out_len = 0;
    }
    int pending = c->out_off < c->out_len;
    if (pending != c->epollout) {
        struct epoll_event ev = {.events = EPOLLIN | (pending ? EPOLLOUT : 0), .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->epollout = pending;
    }
    if (!pending && !nghttp2_session_want_read(c->s) && !nghttp2_session_want_write(c->s))
        return -1;
    return 0;
}

static void conn_new(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL || nghttp2_session_server_new(&c->s, callbacks, c) != 0) {
        free(c);
        close(fd);
        return;
    }
    c->fd = fd;
    connections++;
    nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 1000},
                                   {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
    nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
    nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 4 << 20);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (conn_flush(c) < 0)
        conn_close(c);
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    int port = argc > 1 ? atoi(argv[1]) : 0;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) {
        perror("grpc_echo: bind/listen");
        return 1;
    }
    socklen_t alen = sizeof a;
    getsockname(lfd, (struct sockaddr *)&a, &alen);

    nghttp2_session_callbacks_new(&callbacks);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback(callbacks, on_header);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks, on_frame_recv);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks, on_stream_close);

    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    printf("READY %d\n", ntohs(a.sin_port));
    fflush(stdout);

    static uint8_t buf[65536];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("grpc_echo: epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0)
                    conn_new(fd);
                continue;
            }
            int dead = 0;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
                    dead = 1;
                else if (r > 0 && nghttp2_session_mem_recv(c->s, buf, (size_t)r) < 0)
                    dead = 1;
            }
            if (dead || conn_flush(c) < 0)
                conn_close(c);
        }
    }
}
