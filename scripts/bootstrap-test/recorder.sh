#!/bin/sh
# Stand-in for systemctl, poweroff and shutdown in the bootstrap rootfs test:
# appends "<name> <args>" to /var/log/rp-recorder.log and succeeds.
printf '%s %s\n' "$(basename "$0")" "$*" >>/var/log/rp-recorder.log
