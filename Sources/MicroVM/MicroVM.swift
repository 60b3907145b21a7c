// MicroVM: sources follow.
