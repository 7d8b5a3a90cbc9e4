/* The benchmark's ceiling: a responder that does the least a DNS or DHCP server can do and still
 * satisfy the load generator, so that bench/run.sh can show when dnsperf or perfdhcp, not the
 * server under test, is the limit.
 *
 *   null-responder dns ADDR PORT    answers each query with its own question, QR set, no records
 *   null-responder dhcp ADDR        answers DISCOVER with OFFER and REQUEST with ACK, to the relay
 *                                   (giaddr) that perfdhcp -l plays; one address per MAC
 *
 * One blocking socket, one packet at a time: no state, no files, no logging. Built by
 * bench/run.sh with the system's cc; it never sends anywhere but the address a packet came from
 * (DNS) or the packet's relay address (DHCP), both inside the benchmark's namespaces. */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int bound(const char *addr, int port) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || inet_pton(AF_INET, addr, &sa.sin_addr) != 1 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("null-responder: bind");
        exit(1);
    }
    return fd;
}

static void dns(int fd) {
    unsigned char buf[4096];
    for (;;) {
        struct sockaddr_in from;
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
        if (n < 12) continue;
        buf[2] |= 0x80; /* QR */
        buf[3] = 0x80;  /* RA, NOERROR */
        sendto(fd, buf, n, 0, (struct sockaddr *)&from, len);
    }
}

static void dhcp(int fd, const char *server) {
    unsigned char buf[1500];
    struct in_addr sid;
    inet_pton(AF_INET, server, &sid);
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        /* BOOTREQUEST with the magic cookie, option 53 first as perfdhcp sends it */
        if (n < 243 || buf[0] != 1 || memcmp(buf + 236, "\x63\x82\x53\x63", 4) != 0) continue;
        unsigned char type = 0;
        for (ssize_t i = 240; i + 1 < n && buf[i] != 255;) {
            if (buf[i] == 0) { i++; continue; }
            if (buf[i] == 53 && i + 2 < n) type = buf[i + 2];
            i += 2 + buf[i + 1];
        }
        unsigned char reply_type = type == 1 ? 2 : type == 3 ? 5 : 0;
        if (!reply_type) continue;
        buf[0] = 2; /* BOOTREPLY */
        /* yiaddr: 10.<mac bytes 3..5>, a fixed address per client */
        unsigned char yi[4] = {10, buf[28 + 3], buf[28 + 4], buf[28 + 5]};
        memcpy(buf + 16, yi, 4);
        unsigned char *o = buf + 240;
        *o++ = 53; *o++ = 1; *o++ = reply_type;
        *o++ = 54; *o++ = 4; memcpy(o, &sid, 4); o += 4;
        *o++ = 51; *o++ = 4; memcpy(o, "\x00\x00\xa8\xc0", 4); o += 4;
        *o++ = 1; *o++ = 4; memcpy(o, "\xff\x00\x00\x00", 4); o += 4;
        *o++ = 255;
        struct sockaddr_in relay = {.sin_family = AF_INET, .sin_port = htons(67)};
        memcpy(&relay.sin_addr, buf + 24, 4);
        sendto(fd, buf, o - buf, 0, (struct sockaddr *)&relay, sizeof relay);
    }
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "dns") == 0) dns(bound(argv[2], atoi(argv[3])));
    if (argc == 3 && strcmp(argv[1], "dhcp") == 0) dhcp(bound("0.0.0.0", 67), argv[2]);
    fprintf(stderr, "usage: null-responder dns ADDR PORT | dhcp SERVER_ADDR\n");
    return 2;
}
