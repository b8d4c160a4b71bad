/*
 * vfe-zeroout DEVICE OFFSET LENGTH: zero a byte range of a block device with
 * the BLKZEROOUT ioctl (busybox has no tool for it).  Linux turns that into
 * REQ_OP_WRITE_ZEROES when the device offers it -- for virtio-blk, a
 * VIRTIO_BLK_T_WRITE_ZEROES request -- and into writes of zeros otherwise.
 * OFFSET and LENGTH are bytes, multiples of the logical block size.
 * Exit status: 0 done, 1 the ioctl failed, 2 bad usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int parse(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        return -1;
    *out = v;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t range[2];
    if (argc != 4 || parse(argv[2], &range[0]) || parse(argv[3], &range[1])) {
        fprintf(stderr, "usage: vfe-zeroout DEVICE OFFSET LENGTH\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "vfe-zeroout: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (ioctl(fd, BLKZEROOUT, range) < 0) {
        fprintf(stderr, "vfe-zeroout: BLKZEROOUT %llu+%llu on %s: %s\n",
                (unsigned long long)range[0], (unsigned long long)range[1], argv[1], strerror(errno));
        close(fd);
        return 1;
    }
    close(fd);
    return 0;
}
