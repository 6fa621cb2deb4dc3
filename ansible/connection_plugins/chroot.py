"""Run tasks inside a root filesystem with chroot(8): how the image builder applies the fleet's roles
offline. ansible-core ships no chroot connection (community.general has one); this small one keeps
the image build free of collections."""

from __future__ import annotations

import os
import shutil
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.connection import ConnectionBase

DOCUMENTATION = """
name: chroot
short_description: Run tasks in a root filesystem directory with chroot(8)
description:
  - The host is a directory on the controller holding a Debian root filesystem; needs root.
  - Used by the OpenEgiz Edge image builder (ansible/image.yml).
author: OpenEgiz
options:
  remote_addr:
    description: The root filesystem's directory.
    vars:
      - name: inventory_hostname
      - name: ansible_host
"""

# What a root shell inside the image would have; nothing of the controller's environment leaks in.
ENVIRONMENT = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
               "HOME": "/root"}


class Connection(ConnectionBase):
    """exec_command runs `chroot ROOT /bin/sh -c CMD`; files are copied straight into ROOT."""

    transport = "chroot"
    has_pipelining = True
    has_tty = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.root = os.path.realpath(self._play_context.remote_addr)

    def _connect(self):
        if os.geteuid() != 0:
            raise AnsibleConnectionFailure("the chroot connection needs root")
        if not os.path.isfile(os.path.join(self.root, "bin", "sh")):
            raise AnsibleConnectionFailure(f"{self.root} is not a root filesystem (no /bin/sh)")
        self._connected = True
        return self

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        p = subprocess.run(["chroot", self.root, "/bin/sh", "-c", cmd], input=in_data, capture_output=True,
                           env=ENVIRONMENT, check=False)
        return p.returncode, p.stdout, p.stderr

    def _inside(self, path):
        """The controller's path of `path` in the root filesystem; symlinks may not lead out of it."""
        parent = os.path.realpath(os.path.join(self.root, os.path.dirname(path).lstrip("/")))
        if parent != self.root and not parent.startswith(self.root + os.sep):
            raise AnsibleError(f"{path} leads out of the root filesystem {self.root}")
        return os.path.join(parent, os.path.basename(path))

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        try:
            shutil.copyfile(in_path, self._inside(out_path))
        except OSError as exc:
            raise AnsibleError(f"cannot copy {in_path} to {out_path} in {self.root}: {exc}") from exc

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        try:
            shutil.copyfile(self._inside(in_path), out_path)
        except OSError as exc:
            raise AnsibleError(f"cannot fetch {in_path} from {self.root}: {exc}") from exc

    def close(self):
        self._connected = False
