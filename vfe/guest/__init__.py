"""The project's test guest and the README's demo.

guest_image builds the guest (Debian's kernel plus a busybox initramfs made
from files/ and initramfs.py, an ELF vmlinux from vmlinux.py); vm boots and
drives QEMU VMs running it (console.py: the serial shell; QMP through
vfe.qmp), and is the `vfe-vm` command; controller_process runs a
virtio-net-controller by PID; demo is `scripts/demo`.  Above cli in the
layers: nothing in the daemon imports this package.
"""
