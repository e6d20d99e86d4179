/* read-into — system calls that read into and write from shared memory
 * that is not on the calling rank's node.
 *
 * Rank 0 writes a file of PAGES pages of known bytes. The last rank (on
 * another node when there are several) then:
 *  - read(2)s the first half of the file straight into shared pages it has
 *    never touched (the kernel itself faults on pages missing on its node);
 *  - touches (reads) the pages of the second half first, so that its node
 *    holds them read-only, then read(2)s into them (the kernel's write hits
 *    a write-protected page);
 *  - write(2)s a shared region written by rank 0 (and never touched on its
 *    node) into a second file.
 * Rank 0 checks the shared pages and the second file.
 *
 * Arguments: read-into [PAGES] (default 64). Files go to $TMPDIR (or /tmp).
 */
#include "apputil.h"

#include <fcntl.h>

static unsigned char byte_at(long i) { return (unsigned char)(mix64((uint64_t)i) & 0xff); }

int main(int argc, char **argv)
{
    app_init(argc, argv, "read-into", "[PAGES]", 1);
    long pages = arg_long(argc, argv, 1, 64, 2, 1L << 20);
    size_t len = (size_t)pages * 4096;
    int rank = mome_rank(), nranks = mome_nranks();
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || *tmp == '\0')
        tmp = "/tmp";
    char in_path[4096], out_path[4096];
    snprintf(in_path, sizeof in_path, "%s/read-into-%d-in", tmp, (int)getppid());
    snprintf(out_path, sizeof out_path, "%s/read-into-%d-out", tmp, (int)getppid());

    unsigned char *dst = shared_segment(1, len);
    unsigned char *src = shared_segment(2, len);
    if (rank == 0) {
        unsigned char *buf = xcalloc(len, 1);
        for (size_t i = 0; i < len; i++) {
            buf[i] = byte_at((long)i);
            src[i] = (unsigned char)~byte_at((long)i);
        }
        int fd = open(in_path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
        if (fd < 0 || write(fd, buf, len) != (ssize_t)len || close(fd) != 0)
            die_errno(errno, "writing %s", in_path);
        free(buf);
    }
    barrier(); /* the file and src are ready */
    if (rank == nranks - 1) {
        int fd = open(in_path, O_RDONLY);
        if (fd < 0)
            die_errno(errno, "open %s", in_path);
        size_t half = (size_t)(pages / 2) * 4096;
        ssize_t n = read(fd, dst, half);
        if (n != (ssize_t)half)
            die_errno(n < 0 ? errno : EIO, "read(2) into missing shared pages");
        volatile unsigned long sum = 0;
        for (size_t i = half; i < len; i += 4096)
            sum += dst[i];
        (void)sum;
        n = read(fd, dst + half, len - half);
        if (n != (ssize_t)(len - half))
            die_errno(n < 0 ? errno : EIO, "read(2) into read-only shared pages");
        close(fd);
        int out = open(out_path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
        if (out < 0 || write(out, src, len) != (ssize_t)len || close(out) != 0)
            die_errno(errno, "write(2) from shared pages to %s", out_path);
    }
    barrier(); /* dst and the second file are written */
    int status = 0;
    if (rank == 0) {
        long bad = -1;
        for (size_t i = 0; i < len && bad < 0; i++)
            if (dst[i] != byte_at((long)i))
                bad = (long)i;
        unsigned char *back = xcalloc(len, 1);
        int fd = open(out_path, O_RDONLY);
        if (fd < 0 || read(fd, back, len) != (ssize_t)len)
            die_errno(errno, "reading %s", out_path);
        close(fd);
        for (size_t i = 0; i < len && bad < 0; i++)
            if (back[i] != (unsigned char)~byte_at((long)i))
                bad = (long)(len + i);
        uint64_t h = fnv1a(FNV_INIT, dst, len);
        printf("checksum read-into %016" PRIx64 "\n", h);
        if (bad < 0)
            printf("OK\n");
        else
            printf("MISMATCH at byte %ld of %s\n", bad % (long)len, bad < (long)len ? "the shared pages" : "the written file");
        status = bad < 0 ? 0 : 1;
        unlink(in_path);
        unlink(out_path);
        free(back);
    }
    barrier();
    return status;
}
