"""sha256 of a cifar10-jpeg split decoded by PIL (libjpeg-turbo), in quant-robust's scheme.

The hash covers: the image count (u64, little-endian), the labels (one byte each), then the
pixels (N x 3 x 32 x 32 bytes, CHW), files ordered by class (CIFAR-10 order) and file name.
tests/data.rs pins this value for the test split, so the Rust loader must decode every pixel
exactly as PIL/torchvision do. usage: python3 pil_split_sha256.py ARCHIVE [train|test]
Needs numpy and pillow.
"""
import hashlib, io, struct, sys, tarfile

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main():
    archive, split = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "test")
    with tarfile.open(archive) as tf:
        members = [m for m in tf if m.isfile() and m.name.startswith(split + "/") and m.name.endswith(".jpg")]
        members.sort(key=lambda m: (CLASSES.index(m.name.split("/")[1]), m.name.split("/")[2]))
        labels, images = [], []
        for m in members:
            img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
            images.append(np.asarray(img).transpose(2, 0, 1))
            labels.append(CLASSES.index(m.name.split("/")[1]))
    h = hashlib.sha256()
    h.update(struct.pack("<Q", len(labels)))
    h.update(bytes(labels))
    h.update(np.stack(images).astype(np.uint8).tobytes())
    print(h.hexdigest())


if __name__ == "__main__":
    main()
