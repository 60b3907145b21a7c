// KVMBackend: sources follow.
