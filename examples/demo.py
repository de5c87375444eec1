"""A small inventory module: try `codegen-ls complete examples/demo.py:LINE:COL` on it."""

import json
import os
from dataclasses import dataclass, field


@dataclass
class Item:
    name: str
    price: float
    tags: list[str] = field(default_factory=list)


class Inventory:
    def __init__(self, path):
        self.path = path
        self.items = {}

    def add(self, item):
        self.items[item.name] = item

    def remove(self, name):
        del self.items[name]

    def total(self):
        return sum(item.price for item in self.items.values())

    def save(self):
        with open(self.path, "w") as f:
            json.dump({name: item.price for name, item in self.items.items()}, f)

    def load(self):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            for name, price in json.load(f).items():
                self.add(Item(name, price))

    def clear(self):
        self.items = 