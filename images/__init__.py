"""The gateway's SD-card image builder: a Debian root filesystem with the same Ansible roles a
fleet rollout uses, applied offline, and first-boot provisioning from the boot partition."""
