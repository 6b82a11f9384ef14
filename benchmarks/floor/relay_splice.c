/* relay-splice-floor: relay.c's byte relay with splice(2) instead of read/write: bytes go
 * socket -> pipe -> socket inside the kernel and never reach user memory. The reference for
 * what a zero-copy relay can cost on this machine (the floor of fastmesh's splice relay,
 * fastmesh/_core/splice.pyx), not a proxy anyone should deploy.
 *
 * One thread, level-triggered epoll, one upstream connection per accepted connection (a
 * blocking connect: the upstream is on loopback), and per direction a pipe of 1 MiB (as
 * fastmesh's). On a readiness event the source is spliced into its pipe (up to what the pipe
 * holds), then the pipe into the other socket until it is empty or the socket is full; a pipe
 * left non-empty stops its source being read until the other side is writable again. End of
 * stream shuts the other side's write half once its pipe is empty; both ended or an error
 * closes the pair.
 *
 *   cc -O2 -o relay-splice-floor relay_splice.c
 *   relay-splice-floor LISTEN_PORT UPSTREAM_PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_BYTES (1 << 20)
#define MAX_EVENTS 256

struct side {
    int fd;
    struct side *other;
    int pipe_r, pipe_w;     /* bytes read from this side, on their way to `other` */
    size_t in_pipe;
    int eof;                /* this side sent its FIN */
    int shut;               /* ... and it was passed on (other's write half shut) */
    struct side *next_dead;
};

static struct side *dead;
static int ep;
static struct sockaddr_in upstream;

static void watch(struct side *s, int op, unsigned events)
{
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(ep, op, s->fd, &ev);
}

static void close_pair(struct side *s)
{
    struct side *o = s->other;
    struct side *both[2] = {s, o};
    for (int i = 0; i < 2; i++) {
        close(both[i]->fd);
        close(both[i]->pipe_r);
        close(both[i]->pipe_w);
        both[i]->fd = -1;
    }
    s->next_dead = o;
    o->next_dead = dead;
    dead = s;
}

static void bury_dead(void)
{
    while (dead) {
        struct side *next = dead->next_dead;
        free(dead);
        dead = next;
    }
}

/* The events each side waits for: reading while its pipe is empty and no FIN came; writing
 * while the other side's pipe holds bytes for it. */
static void rewatch(struct side *s)
{
    unsigned ev = 0;
    if (!s->eof && s->in_pipe == 0)
        ev |= EPOLLIN;
    if (s->other->in_pipe)
        ev |= EPOLLOUT;
    watch(s, EPOLL_CTL_MOD, ev);
}

/* Move s's pipe into s->other. Returns -1 on an error (the pair is to be closed). */
static int drain_pipe(struct side *s)
{
    struct side *o = s->other;
    while (s->in_pipe) {
        ssize_t n = splice(s->pipe_r, NULL, o->fd, NULL, s->in_pipe,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) {
            if (errno == EAGAIN)
                return 0;
            if (errno == EINTR)
                continue;
            return -1;
        }
        s->in_pipe -= n;
    }
    if (s->eof && !s->shut) {
        shutdown(o->fd, SHUT_WR);
        s->shut = 1;
    }
    return 0;
}

/* An event on s: read what it has into its pipe, pass pipes on. Returns 0 if closed. */
static int on_event(struct side *s, unsigned events)
{
    struct side *o = s->other;
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !s->eof && s->in_pipe == 0) {
        ssize_t n = splice(s->fd, NULL, s->pipe_w, NULL, PIPE_BYTES,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n == 0)
            s->eof = 1;
        else if (n > 0)
            s->in_pipe = n;
        else if (errno != EAGAIN && errno != EINTR) {
            close_pair(s);
            return 0;
        }
    }
    if (drain_pipe(s) < 0 || drain_pipe(o) < 0) {
        close_pair(s);
        return 0;
    }
    if (s->shut && o->shut) {
        close_pair(s);
        return 0;
    }
    rewatch(s);
    rewatch(o);
    return 1;
}

static int make_side(struct side *s, int fd)
{
    int p[2];
    s->fd = fd;
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    s->pipe_r = p[0];
    s->pipe_w = p[1];
    fcntl(s->pipe_w, F_SETPIPE_SZ, PIPE_BYTES);
    return 0;
}

static void accept_one(int lfd)
{
    int one = 1;
    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
    if (cfd < 0)
        return;
    int ufd = socket(AF_INET, SOCK_STREAM, 0);
    if (ufd < 0 || connect(ufd, (struct sockaddr *)&upstream, sizeof upstream) < 0
            || fcntl(ufd, F_SETFL, O_NONBLOCK) < 0) {
        close(cfd);
        if (ufd >= 0)
            close(ufd);
        return;
    }
    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(ufd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct side *c = calloc(1, sizeof *c), *u = calloc(1, sizeof *u);
    if (make_side(c, cfd) < 0 || make_side(u, ufd) < 0) {
        close(cfd);
        close(ufd);
        free(c);
        free(u);
        return;
    }
    c->other = u;
    u->other = c;
    watch(c, EPOLL_CTL_ADD, EPOLLIN);
    watch(u, EPOLL_CTL_ADD, EPOLLIN);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s LISTEN_PORT UPSTREAM_PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit nofile;                  /* six descriptors per relayed connection */
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
        perror("relay-splice-floor: listen");
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
            on_event(s, events[i].events);
        }
        bury_dead();
    }
}
