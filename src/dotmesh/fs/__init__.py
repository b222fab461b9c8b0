"""Filesystem primitives below the store: btrfs subvolumes and snapshots, reflinks, extent
maps, and removing trees that hold them."""
