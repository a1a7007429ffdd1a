"""Loads a golden checkpoint into a PyTorch ResNet-20 with the common module names
(conv1, bn1, layer{1,2,3}.{0,1,2}.{conv1,bn1,conv2,bn2}, linear; option-A shortcuts) with
load_state_dict(strict=True), evaluates it on the cifar10-jpeg test split (decoded by PIL) and
prints the accuracy, to compare with the manifest's.

Needs torch, numpy, pillow, safetensors (pip). usage: pytorch_load_check.py CKPT DATA
"""
import io
import json
import sys
import tarfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.extra = cout - cin

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        sc = x
        if self.extra:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + sc)


class ResNet20(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for s, cout in enumerate([16, 32, 64], 1):
            blocks = []
            for k in range(3):
                blocks.append(Block(cin, cout, 2 if (s > 1 and k == 0) else 1))
                cin = cout
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, 10)
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_split(path):
    xs, ys = [], []
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile() and m.name.startswith("test/") and m.name.endswith(".jpg"):
                cls = m.name.split("/")[1]
                img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                xs.append(np.asarray(img))
                ys.append(CLASSES.index(cls))
    x = torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    return x, torch.tensor(ys)


def main():
    ckpt, data = sys.argv[1], sys.argv[2]
    model = ResNet20()
    missing_unexpected = model.load_state_dict(load_file(ckpt), strict=True)
    model.eval()
    x, y = test_split(data)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), 500):
            correct += (model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum().item()
    print(json.dumps({
        "checkpoint": ckpt,
        "torch": torch.__version__,
        "load_state_dict": str(missing_unexpected),
        "correct": correct,
        "total": len(y),
        "accuracy": correct / len(y),
    }))


if __name__ == "__main__":
    main()
