"""Native CPU kernels, compiled from C on first use and called through ctypes (moelab.kernels.build).

Each has a PyTorch equivalent that is the reference its tests compare against and the path taken
when no C compiler is available."""
