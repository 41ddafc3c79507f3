#!/bin/sh
# /init of initramfs-busybox.cpio: mount the usual file systems, print the
# BUSYBOX-READY banner and run an interactive shell on the console (again
# and again: PID 1 must not exit). The workload is /bin/workload
# (e.g. `workload mem=4 passes=3`; it reads workload.* from /proc/cmdline too).
# Shell built-ins only before the banner: every fork/exec is slow on kvm_pvm.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin HOME=/root
read up _ < /proc/uptime
echo "BUSYBOX-READY ms=${up%.*}${up#*.}0"
cd /root
while :; do
    setsid cttyhack sh -l
    echo "shell exited; starting a new one (reboot: 'reboot -f')"
done
