/* relay-uring-floor: relay.c's job (the cheapest TCP relay, a reference point for the
 * benchmark tables, not a proxy) done on io_uring, to show what the kernel charges when
 * system calls are batched: the floor any io_uring engine can reach on this machine.
 *
 * One thread, one ring. A multishot accept takes connections; each gets one upstream
 * connection (a blocking connect: the upstream is on loopback). Every socket has one
 * multishot receive that picks its buffers from one provided-buffer ring (16 KiB each); a
 * received buffer is sent as it is to the other side and goes back to the ring when the
 * send completes. One send at a time per socket keeps bytes in order; the others queue. When
 * the ring runs dry a receive ends with ENOBUFS and is re-armed as buffers come back
 * (back-pressure). End of stream or an error on either side closes both once what was read
 * is written. Every submission and every completion of a loop iteration share one
 * io_uring_enter.
 *
 * It parses nothing, so for HTTP it is a pass-through: less work than any HTTP proxy.
 *
 *   cc -O2 -o relay-uring-floor relay_uring.c -luring     (apt: liburing-dev)
 *   relay-uring-floor LISTEN_PORT UPSTREAM_PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define RING_ENTRIES 4096
#define CQ_ENTRIES 16384
#define BUF_BYTES 16384
#define BUF_COUNT 2048              /* a power of two: 32 MiB of receive buffers */
#define BUF_GROUP 1

enum { OP_ACCEPT = 1, OP_RECV = 2, OP_SEND = 3 };      /* low bits of user_data */

struct chunk {                      /* a received buffer on its way to the other side */
    unsigned short bid;
    unsigned len, off;
    struct chunk *next;
};

struct pair;

struct side {
    int fd;
    struct side *other;
    struct pair *pair;
    int receiving;                  /* its multishot receive is armed */
    int sending;                    /* a send to this socket is in flight (queue head) */
    int eof;                        /* nothing more will be read from it */
    int starved;                    /* its receive ended for want of buffers */
    struct chunk *head, *tail;      /* what waits to be written to this socket */
    struct side *next_starved;
} __attribute__((aligned(8)));

struct pair {
    struct side a, b;
    int ops;                        /* operations in flight naming this pair */
    int closing;
};

static struct io_uring ring;
static struct io_uring_buf_ring *br;
static char *bufs;
static struct sockaddr_in upstream;
static int listen_fd;
static struct side *starved;

static struct io_uring_sqe *sqe_get(void)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    if (!sqe) {                     /* the submission queue is full: hand it over first */
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

static void arm_accept(void)
{
    struct io_uring_sqe *sqe = sqe_get();
    io_uring_prep_multishot_accept(sqe, listen_fd, NULL, NULL, 0);
    io_uring_sqe_set_data64(sqe, OP_ACCEPT);
}

static void arm_recv(struct side *s)
{
    struct io_uring_sqe *sqe = sqe_get();
    io_uring_prep_recv_multishot(sqe, s->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BUF_GROUP;
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)s | OP_RECV);
    s->receiving = 1;
    s->pair->ops++;
}

static void give_back(unsigned short bid)
{
    io_uring_buf_ring_add(br, bufs + (size_t)bid * BUF_BYTES, BUF_BYTES, bid,
                          io_uring_buf_ring_mask(BUF_COUNT), 0);
    io_uring_buf_ring_advance(br, 1);
}

static void kick_send(struct side *d)
{
    struct chunk *c = d->head;
    struct io_uring_sqe *sqe;
    if (d->sending || !c || d->pair->closing)
        return;
    sqe = sqe_get();
    io_uring_prep_send(sqe, d->fd, bufs + (size_t)c->bid * BUF_BYTES + c->off,
                       c->len - c->off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, (uint64_t)(uintptr_t)d | OP_SEND);
    d->sending = 1;
    d->pair->ops++;
}

static void drop_queue(struct side *d)
{
    struct chunk *c = d->head, *n;
    if (d->sending && c)            /* the one in flight is given back when it completes */
        c = c->next, d->head->next = NULL;
    else
        d->head = d->tail = NULL;
    for (; c; c = n) {
        n = c->next;
        give_back(c->bid);
        free(c);
    }
    if (d->sending)
        d->tail = d->head;
}

static void close_pair(struct pair *p)
{
    if (p->closing)
        return;
    p->closing = 1;
    drop_queue(&p->a);
    drop_queue(&p->b);
    /* ends both multishot receives (and any send) with a completion */
    shutdown(p->a.fd, SHUT_RDWR);
    shutdown(p->b.fd, SHUT_RDWR);
}

static void maybe_free(struct pair *p)
{
    if (p->closing && p->ops == 0) {
        struct side **q;
        for (q = &starved; *q;) {
            if ((*q)->pair == p)
                *q = (*q)->next_starved;
            else
                q = &(*q)->next_starved;
        }
        close(p->a.fd);
        close(p->b.fd);
        free(p);
    }
}

/* A side that reached end of stream closes the pair once the other direction's bytes
 * already read are written. */
static void check_done(struct pair *p)
{
    if (!p->closing && ((p->a.eof && !p->b.head) || (p->b.eof && !p->a.head)))
        close_pair(p);
}

static void on_accept(struct io_uring_cqe *cqe)
{
    int one = 1;
    struct pair *p;
    int up;
    if (!(cqe->flags & IORING_CQE_F_MORE))
        arm_accept();
    if (cqe->res < 0)
        return;
    up = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (up < 0 || connect(up, (struct sockaddr *)&upstream, sizeof(upstream)) < 0) {
        if (up >= 0)
            close(up);
        close(cqe->res);
        return;
    }
    setsockopt(cqe->res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(up, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    p = calloc(1, sizeof(*p));
    p->a.fd = cqe->res;
    p->b.fd = up;
    p->a.other = &p->b;
    p->b.other = &p->a;
    p->a.pair = p->b.pair = p;
    arm_recv(&p->a);
    arm_recv(&p->b);
}

static void on_recv(struct side *s, struct io_uring_cqe *cqe)
{
    struct pair *p = s->pair;
    if (cqe->res > 0) {
        unsigned short bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
        if (p->closing) {
            give_back(bid);
        } else {
            struct side *d = s->other;
            struct chunk *c = malloc(sizeof(*c));
            c->bid = bid;
            c->len = (unsigned)cqe->res;
            c->off = 0;
            c->next = NULL;
            if (d->tail)
                d->tail->next = c;
            else
                d->head = c;
            d->tail = c;
            kick_send(d);
        }
    }
    if (cqe->flags & IORING_CQE_F_MORE)
        return;
    /* this receive is over */
    s->receiving = 0;
    p->ops--;
    if (p->closing) {
        maybe_free(p);
    } else if (cqe->res == -ENOBUFS) {
        s->starved = 1;
        s->next_starved = starved;
        starved = s;
    } else if (cqe->res <= 0) {
        s->eof = 1;
        if (cqe->res < 0)
            close_pair(p);
        else
            check_done(p);
        maybe_free(p);
    } else {
        arm_recv(s);                /* ended with data (the kernel may do that): go on */
    }
}

static void on_send(struct side *d, struct io_uring_cqe *cqe)
{
    struct pair *p = d->pair;
    struct chunk *c = d->head;
    d->sending = 0;
    p->ops--;
    if (cqe->res < 0 || p->closing) {
        if (c) {
            d->head = c->next;
            if (!d->head)
                d->tail = NULL;
            give_back(c->bid);
            free(c);
        }
        close_pair(p);
        maybe_free(p);
        return;
    }
    c->off += (unsigned)cqe->res;
    if (c->off == c->len) {
        d->head = c->next;
        if (!d->head)
            d->tail = NULL;
        give_back(c->bid);
        free(c);
        while (starved) {           /* buffers are back: starved receives go on */
            struct side *s = starved;
            starved = s->next_starved;
            s->starved = 0;
            if (!s->pair->closing && !s->receiving && !s->eof)
                arm_recv(s);
        }
    }
    kick_send(d);
    check_done(p);
    maybe_free(p);
}

int main(int argc, char **argv)
{
    struct io_uring_params params;
    struct io_uring_buf_reg reg;
    struct sockaddr_in addr;
    struct rlimit rl = {65536, 65536};
    int one = 1, i, rc;

    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    setrlimit(RLIMIT_NOFILE, &rl);
    memset(&upstream, 0, sizeof(upstream));
    upstream.sin_family = AF_INET;
    upstream.sin_port = htons((unsigned short)atoi(argv[2]));
    upstream.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    memset(&params, 0, sizeof(params));
    params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    params.cq_entries = CQ_ENTRIES;
    rc = io_uring_queue_init_params(RING_ENTRIES, &ring, &params);
    if (rc == -EINVAL) {            /* an older kernel: without the single-issuer hints */
        memset(&params, 0, sizeof(params));
        params.flags = IORING_SETUP_CQSIZE;
        params.cq_entries = CQ_ENTRIES;
        rc = io_uring_queue_init_params(RING_ENTRIES, &ring, &params);
    }
    if (rc < 0) {
        fprintf(stderr, "io_uring: %s\n", strerror(-rc));
        return 1;
    }
    if (posix_memalign((void **)&br, 4096, BUF_COUNT * sizeof(struct io_uring_buf)) ||
        posix_memalign((void **)&bufs, 4096, (size_t)BUF_COUNT * BUF_BYTES)) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (unsigned long)br;
    reg.ring_entries = BUF_COUNT;
    reg.bgid = BUF_GROUP;
    rc = io_uring_register_buf_ring(&ring, &reg, 0);
    if (rc < 0) {
        fprintf(stderr, "provided buffer ring: %s\n", strerror(-rc));
        return 1;
    }
    io_uring_buf_ring_init(br);
    for (i = 0; i < BUF_COUNT; i++)
        io_uring_buf_ring_add(br, bufs + (size_t)i * BUF_BYTES, BUF_BYTES, (unsigned short)i,
                              io_uring_buf_ring_mask(BUF_COUNT), i);
    io_uring_buf_ring_advance(br, BUF_COUNT);

    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listen_fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        listen(listen_fd, 4096) < 0) {
        perror("listen");
        return 1;
    }
    arm_accept();
    printf("READY\n");
    fflush(stdout);

    for (;;) {
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        rc = io_uring_submit_and_wait(&ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            fprintf(stderr, "io_uring_enter: %s\n", strerror(-rc));
            return 1;
        }
        io_uring_for_each_cqe(&ring, head, cqe) {
            uint64_t ud = io_uring_cqe_get_data64(cqe);
            struct side *s = (struct side *)(uintptr_t)(ud & ~(uint64_t)7);
            switch (ud & 7) {
            case OP_ACCEPT: on_accept(cqe); break;
            case OP_RECV: on_recv(s, cqe); break;
            case OP_SEND: on_send(s, cqe); break;
            }
            seen++;
        }
        io_uring_cq_advance(&ring, seen);
    }
}
