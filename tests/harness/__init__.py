"""What the tests drive around the code under test: DPDK testpmd, Open
vSwitch, network namespaces, qemu-storage-daemon, the guest's block
benchmark, second builds for live updates, other local users, and the
in-process rigs for the engine and the protocol.  Not part of the wheel;
docs/design.md ("Layout") says what each module is for."""
