/*
 * bind_localhost.c: an LD_PRELOAD shim that turns wildcard binds into loopback binds.
 *
 * Where it sits: tests/support/servers.py starts Orthanc for the DICOMweb tests and tools. Orthanc
 * 1.10 has no bind-address option and listens on every interface; with this library preloaded,
 * a bind() to INADDR_ANY becomes 127.0.0.1 and a bind() to in6addr_any becomes ::1, so the test
 * server is reachable from this machine only. Binds to a specific address are left untouched.
 *
 * Build (the launcher does this when the .so is missing or older than this file):
 *   gcc -shared -fPIC -O2 -o .medagent/build/bind_localhost.so tools/bind_localhost.c -ldl
 * Use:
 *   LD_PRELOAD=.medagent/build/bind_localhost.so Orthanc config.json
 * Set BIND_LOCALHOST_DEBUG=1 to log each rewrite on stderr.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn resolve_real_bind(void) {
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) {
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    }
    return real_bind;
}

static void debug_log(const char *family, int port) {
    const char *flag = getenv("BIND_LOCALHOST_DEBUG");
    if (flag != NULL && flag[0] != '\0' && flag[0] != '0') {
        fprintf(stderr, "bind_localhost: wildcard %s bind on port %d rewritten to loopback\n", family, port);
    }
}

int bind(int sockfd, const struct sockaddr *addr, socklen_t addrlen) {
    bind_fn real_bind = resolve_real_bind();
    if (real_bind == NULL) {
        /* Without the real symbol there is nothing safe to do: refuse rather than bind wide. */
        errno = ENOSYS;
        return -1;
    }
    if (addr == NULL) {
        return real_bind(sockfd, addr, addrlen);
    }

    if (addr->sa_family == AF_INET && addrlen >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in4 = (const struct sockaddr_in *)addr;
        if (in4->sin_addr.s_addr == htonl(INADDR_ANY)) {
            /* Copy: the caller's struct may be const or reused. */
            struct sockaddr_in local;
            memcpy(&local, in4, sizeof(local));
            local.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            debug_log("IPv4", ntohs(local.sin_port));
            return real_bind(sockfd, (const struct sockaddr *)&local, sizeof(local));
        }
    } else if (addr->sa_family == AF_INET6 && addrlen >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
        if (memcmp(&in6->sin6_addr, &in6addr_any, sizeof(struct in6_addr)) == 0) {
            struct sockaddr_in6 local;
            memcpy(&local, in6, sizeof(local));
            local.sin6_addr = in6addr_loopback;
            debug_log("IPv6", ntohs(local.sin6_port));
            return real_bind(sockfd, (const struct sockaddr *)&local, sizeof(local));
        }
    }
    return real_bind(sockfd, addr, addrlen);
}
