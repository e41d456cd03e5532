/* A hostile builder for cairn's end-to-end tests (tests/tests/build_hostile.rs): each mode
   tries one way out of the sandbox, writes what it saw to $out (or fails), and never needs
   anything from the sandbox but itself. Static, so that it runs in an empty root. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/statvfs.h>
#include <unistd.h>

static FILE *out(void) {
    const char *p = getenv("out");
    FILE *f = p ? fopen(p, "w") : NULL;
    if (!f) { perror("open $out"); exit(2); }
    return f;
}

static const char INJECT[] = "echo CAIRN-INJECTED\n";

/* Pushes INJECT into fd's terminal input; returns 0 or the errno of the first refusal. */
static int inject(int fd) {
    for (const char *c = INJECT; *c; c++)
        if (ioctl(fd, TIOCSTI, c) < 0) return errno;
    return 0;
}

static int tty(void) {
    FILE *o = out();
    char stat[1024] = {0};
    FILE *s = fopen("/proc/self/stat", "r");
    if (s) { fread(stat, 1, sizeof stat - 1, s); fclose(s); }
    char *p = strrchr(stat, ')');
    int pgrp = -1, sid = -1, tty_nr = -1, ppid = -1; char state;
    if (p) sscanf(p + 2, "%c %d %d %d %d", &state, &ppid, &pgrp, &sid, &tty_nr);
    fprintf(o, "tty_nr %d\n", tty_nr);
    fprintf(o, "session_leader %d\n", getsid(0) == getpid());
    int t = open("/dev/tty", O_RDWR);
    fprintf(o, "open /dev/tty %s\n", t < 0 ? strerrorname_np(errno) : "ok");
    if (t >= 0) {
        int r = inject(t);
        fprintf(o, "inject /dev/tty %s\n", r ? strerrorname_np(r) : "ok");
    }
    /* Every descriptor it has, 0-2 first. */
    for (int fd = 0; fd < 1024; fd++) {
        if (fcntl(fd, F_GETFD) < 0) continue;
        int r = inject(fd);
        fprintf(o, "inject fd %d %s\n", fd, r ? strerrorname_np(r) : "ok");
    }
    /* A terminal of its own would need a pty device. */
    int m = open("/dev/ptmx", O_RDWR);
    fprintf(o, "open /dev/ptmx %s\n", m < 0 ? strerrorname_np(errno) : "ok");
    return 0;
}

static int fds(void) {
    FILE *o = out();
    DIR *d = opendir("/proc/self/fd");
    if (!d) { perror("opendir /proc/self/fd"); return 2; }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || atoi(e->d_name) == dirfd(d) || atoi(e->d_name) == fileno(o)) continue;
        char link[4096] = {0}, path[300];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        readlink(path, link, sizeof link - 1);
        fprintf(o, "%s %s\n", e->d_name, link);
    }
    return 0;
}

static int processes(void) {
    int n = 0;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) n += atoi(e->d_name) > 0;
    if (d) closedir(d);
    return n;
}

static int forkbomb(void) {
    int forked = 0;
    for (;;) {
        pid_t p = fork();
        if (p == 0) {
            /* Every child forks forever, backing off a little when refused. */
            for (;;) if (fork() < 0) usleep(20000);
        }
        if (p < 0) break;
        forked++;
    }
    int err = errno;
    fprintf(stderr, "fork: %s after %d forks by the builder\n", strerror(err), forked);
    sleep(5); /* the bomb goes on while the test looks at the host */
    fprintf(stderr, "processes in the sandbox: %d\n", processes());
    return 1;
}

static int shm(void) {
    static char mib[1 << 20];
    memset(mib, 'x', sizeof mib);
    int f = open("/dev/shm/fill", O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (f < 0) { perror("open /dev/shm/fill"); return 2; }
    struct statvfs v;
    if (statvfs("/dev/shm", &v) == 0)
        fprintf(stderr, "/dev/shm holds %llu KiB\n", (unsigned long long)v.f_blocks * v.f_frsize / 1024);
    /* At most 256 MiB, so that a sandbox without the limit does not eat the test host. */
    for (int n = 0; n < 256; n++) {
        if (write(f, mib, sizeof mib) != (ssize_t)sizeof mib) {
            fprintf(stderr, "write /dev/shm/fill: %s after %d MiB\n", strerror(errno), n);
            return 1;
        }
    }
    fprintf(stderr, "wrote 256 MiB to /dev/shm\n");
    fclose(out());
    return 0;
}

static int sparse(void) {
    FILE *o = out();
    if (ftruncate(fileno(o), 2LL << 30) < 0) { perror("ftruncate"); return 2; }
    return 0;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "tty")) return tty();
    if (!strcmp(mode, "fds")) return fds();
    if (!strcmp(mode, "forkbomb")) return forkbomb();
    if (!strcmp(mode, "shm")) return shm();
    if (!strcmp(mode, "sparse")) return sparse();
    fprintf(stderr, "unknown mode '%s'\n", mode);
    return 2;
}
