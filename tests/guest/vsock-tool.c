/* vsock-tool: the guest side of minivmm's vsock tests (busybox has no AF_VSOCK client).
 *
 *   vsock-tool listen PORT echo        accept connections (one child each) and echo every byte back
 *   vsock-tool connect CID PORT send N send N pattern bytes, shut down the write side, then print
 *                                      the peer's one-line answer
 *   vsock-tool connect CID PORT echo N send N pattern bytes while reading the echo; print
 *                                      "<bytes> <fnv1a64 hex>" of what came back
 *
 * The pattern byte at offset i is (i * 31 + i / 4096) & 0xff; checksums are FNV-1a 64.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *what) {
	fprintf(stderr, "vsock-tool: %s: %s\n", what, strerror(errno));
	exit(1);
}

static unsigned char pattern(uint64_t i) { return (unsigned char)((i * 31 + i / 4096) & 0xff); }

static void echo(int fd) {
	char buf[65536];
	for (;;) {
		ssize_t n = read(fd, buf, sizeof buf);
		if (n < 0 && errno == EINTR) continue;
		if (n <= 0) break;
		for (ssize_t off = 0; off < n;) {
			ssize_t w = write(fd, buf + off, n - off);
			if (w < 0 && errno == EINTR) continue;
			if (w <= 0) exit(1);
			off += w;
		}
	}
	shutdown(fd, SHUT_WR);
}

int main(int argc, char **argv) {
	signal(SIGPIPE, SIG_IGN);
	if (argc == 4 && !strcmp(argv[1], "listen")) {
		signal(SIGCHLD, SIG_IGN);
		int s = socket(AF_VSOCK, SOCK_STREAM, 0);
		if (s < 0) die("socket");
		struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = atoi(argv[2])};
		if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
		if (listen(s, 64) < 0) die("listen");
		printf("VSOCK-LISTENING %s\n", argv[2]);
		fflush(stdout);
		for (;;) {
			int c = accept(s, NULL, NULL);
			if (c < 0) {
				if (errno == EINTR) continue;
				die("accept");
			}
			if (fork() == 0) {
				close(s);
				echo(c);
				_exit(0);
			}
			close(c);
		}
	}
	if (argc == 6 && !strcmp(argv[1], "connect")) {
		uint64_t n = strtoull(argv[5], NULL, 10);
		int s = socket(AF_VSOCK, SOCK_STREAM, 0);
		if (s < 0) die("socket");
		struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = atoi(argv[2]), .svm_port = atoi(argv[3])};
		if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
		int want_echo = !strcmp(argv[4], "echo");
		uint64_t sent = 0, got = 0, hash = 1469598103934665603ULL;
		char out[65536], in[65536];
		int wr_open = 1;
		while (wr_open || (want_echo && got < n) || !want_echo) {
			struct pollfd p = {.fd = s, .events = POLLIN | (wr_open ? POLLOUT : 0)};
			if (poll(&p, 1, -1) < 0) {
				if (errno == EINTR) continue;
				die("poll");
			}
			if (wr_open && (p.revents & POLLOUT)) {
				size_t k = 0;
				while (k < sizeof out && sent + k < n) {
					out[k] = pattern(sent + k);
					k++;
				}
				ssize_t w = k ? write(s, out, k) : 0;
				if (w < 0 && errno != EAGAIN && errno != EINTR) die("write");
				if (w > 0) sent += w;
				if (sent == n) {
					shutdown(s, SHUT_WR);
					wr_open = 0;
				}
			}
			if (p.revents & (POLLIN | POLLHUP)) {
				ssize_t r = read(s, in, sizeof in);
				if (r < 0 && errno == EINTR) continue;
				if (r < 0) die("read");
				if (r == 0) break;
				if (want_echo) {
					for (ssize_t i = 0; i < r; i++) {
						hash ^= (unsigned char)in[i];
						hash *= 1099511628211ULL;
					}
					got += r;
				} else {
					fwrite(in, 1, r, stdout);
				}
			}
		}
		if (want_echo) printf("%llu %016llx\n", (unsigned long long)got, (unsigned long long)hash);
		fflush(stdout);
		return 0;
	}
	fprintf(stderr, "usage: vsock-tool listen PORT echo | connect CID PORT send|echo N\n");
	return 2;
}
