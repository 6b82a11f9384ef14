/* relay-floor: the cheapest TCP relay this machine can run, as a reference point for the
 * benchmark tables (not a proxy anyone should deploy).
 *
 * One thread, level-triggered epoll, one upstream connection per accepted connection (made
 * with a blocking connect: the upstream is on loopback), one read() per readiness event into
 * a 64 KiB stack buffer and one write() of it to the other side. Bytes that do not fit in the
 * other side's socket buffer wait in a heap buffer, and the side they came from stops being
 * read until they are gone. End of stream or an error on either side closes both, after any
 * waiting bytes are written.
 *
 * It parses nothing, so for HTTP it is a pass-through: less work than any HTTP proxy.
 *
 *   cc -O2 -o relay-floor relay.c
 *   relay-floor LISTEN_PORT UPSTREAM_PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <fcntl.h>
#include <unistd.h>

#define READ_BYTES 65536
#define MAX_EVENTS 256

struct side {
    int fd;
    struct side *other;
    char *waiting;          /* bytes read from `other`, not yet written to this side */
    size_t waiting_off, waiting_len;
    int closing;            /* close both once `waiting` is written */
    struct side *next_dead; /* freed after the current batch of events */
};

static struct side *dead;

static int ep;
static struct sockaddr_in upstream;

static void watch(struct side *s, int op, unsigned events)
{
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(ep, op, s->fd, &ev);
}

/* Close both sides now; free them after this batch, which may still name them. */
static void close_pair(struct side *s)
{
    struct side *o = s->other;
    close(s->fd);
    close(o->fd);
    s->fd = o->fd = -1;
    s->next_dead = o;
    o->next_dead = dead;
    dead = s;
}

static void bury_dead(void)
{
    while (dead) {
        struct side *next = dead->next_dead;
        free(dead->waiting);
        free(dead);
        dead = next;
    }
}

static int nodelay(int fd)
{
    int one = 1;
    return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void accept_one(int lfd)
{
    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
    if (cfd < 0)
        return;
    int ufd = socket(AF_INET, SOCK_STREAM, 0);
    if (ufd < 0 || connect(ufd, (struct sockaddr *)&upstream, sizeof upstream) < 0) {
        close(cfd);
        if (ufd >= 0)
            close(ufd);
        return;
    }
    if (fcntl(ufd, F_SETFL, O_NONBLOCK) < 0) {
        close(cfd);
        close(ufd);
        return;
    }
    nodelay(cfd);
    nodelay(ufd);
    struct side *c = calloc(1, sizeof *c), *u = calloc(1, sizeof *u);
    c->fd = cfd;
    u->fd = ufd;
    c->other = u;
    u->other = c;
    watch(c, EPOLL_CTL_ADD, EPOLLIN);
    watch(u, EPOLL_CTL_ADD, EPOLLIN);
}

/* `s` is readable: move what is there to s->other. Returns 0 if the pair was closed. */
static int on_readable(struct side *s)
{
    char buf[READ_BYTES];
    struct side *o = s->other;
    ssize_t n = read(s->fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 1;
    if (n <= 0) {
        if (o->waiting_len) {           /* flush what is waiting, then close */
            o->closing = 1;
            watch(s, EPOLL_CTL_MOD, 0);
            return 1;
        }
        close_pair(s);
        return 0;
    }
    ssize_t w = write(o->fd, buf, n);
    if (w < 0) {
        if (errno != EAGAIN) {
            close_pair(s);
            return 0;
        }
        w = 0;
    }
    if (w < n) {                        /* the rest waits; stop reading s until it is gone */
        o->waiting = malloc(n - w);
        memcpy(o->waiting, buf + w, n - w);
        o->waiting_off = 0;
        o->waiting_len = n - w;
        watch(s, EPOLL_CTL_MOD, 0);
        watch(o, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
    }
    return 1;
}

/* `s` is writable and has bytes waiting. */
static void on_writable(struct side *s)
{
    ssize_t w = write(s->fd, s->waiting + s->waiting_off, s->waiting_len);
    if (w < 0) {
        if (errno != EAGAIN)
            close_pair(s);
        return;
    }
    s->waiting_off += w;
    s->waiting_len -= w;
    if (s->waiting_len)
        return;
    free(s->waiting);
    s->waiting = NULL;
    if (s->closing) {
        close_pair(s);
        return;
    }
    watch(s, EPOLL_CTL_MOD, EPOLLIN);
    watch(s->other, EPOLL_CTL_MOD, EPOLLIN);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit nofile;                  /* two descriptors per relayed connection */
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    upstream = addr;
    upstream.sin_port = htons(atoi(argv[2]));

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("relay-floor: listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            struct side *s = events[i].data.ptr;
            if (s == NULL) {
                accept_one(lfd);
                continue;
            }
            if (s->fd < 0)              /* closed earlier in this batch */
                continue;
            if ((events[i].events & EPOLLOUT) && s->waiting_len) {
                on_writable(s);
                continue;
            }
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                on_readable(s);
        }
        bury_dead();
    }
}
