#!/bin/bash
# Container entry point of the project image (Dockerfile) on a RunPod pod: install the account's
# SSH keys that RunPod passes in PUBLIC_KEY, start sshd, and stay up. Ray does the rest over SSH.
set -euo pipefail
if [ -n "${PUBLIC_KEY:-}" ]; then
    echo "$PUBLIC_KEY" >> /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
fi
ssh-keygen -A
# Pod env (RUNPOD_POD_ID, HF_HOME, ...) for SSH sessions, which do not inherit PID 1's env.
env | grep -E '^(RUNPOD_|HF_|CUDA|NVIDIA|PATH=|VIRTUAL_ENV=)' | while IFS= read -r line; do
    printf 'export %s=%q\n' "${line%%=*}" "${line#*=}"
done > /etc/profile.d/pod_env.sh
/usr/sbin/sshd
exec sleep infinity
