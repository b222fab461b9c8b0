"""Live capture: find the processes writing to a dot, freeze them, always thaw them."""
