// LinuxSystem: sources follow.
