"""What leaves the compiler: artifacts, remote runs, the board-side kit."""
