#!/bin/sh
# Run by busybox init (respawn). The pause keeps a crashing agent from
# spinning.
/sbin/enilab-agent
echo "enilab-agent exited with status $?; restarting in 1 s"
sleep 1
