#!/usr/bin/env bash
# podman with the global flags this kind of VM needs: runc (crun refuses the hybrid
# cgroup layout) and the cgroupfs manager (no systemd session here).
exec podman --runtime runc --cgroup-manager=cgroupfs "$@"
