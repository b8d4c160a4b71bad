# volatile fields in vfe's CLI outputs and logs (capture.sh adds the temp root,
# checkout and namespace names)
# PIDs: JSON fields and daemon prefixes
s/"pid": [0-9]\+/"pid": <PID>/g
s/\(vfe-vhostd\|virtio-net-controller\|virtnet\)\[[0-9]\+\]/\1[<PID>]/g
s/\bpid [0-9]\+/pid <PID>/g
# build times ("Jan  5 2025 10:11:12" and ISO forms) and start times
s/[A-Z][a-z][a-z] [ 0-9][0-9] [0-9]\{4\} [0-9:]\{8\}/<TIME>/g
s/[0-9]\{4\}-[0-9][0-9]-[0-9][0-9][T ][0-9:]\{8\}\([.,][0-9]\+\)\?\(Z\|[+-][0-9:]\{4,5\}\)\?/<TIME>/g
# uptimes and durations
s/"uptime\(_s\|_seconds\)\?": [0-9.]\+/"uptime\1": <N>/g
# source locations in log lines (they move whenever code does): file.py:LINE
s/\([A-Za-z_0-9]\+\.py\):[0-9]\+:/\1:<LINE>:/g
# random MACs (an SR-IOV VF's, locally administered unicast: x2/x6/xA/xE first octet)
s/\b[0-9a-fA-F][26aeAE]\(:[0-9a-fA-F][0-9a-fA-F]\)\{5\}\b/<RANDOM-MAC>/g
