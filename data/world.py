"""The tiny world's facts: a small fixed world every embedded dataset is generated from.

`build_world()` (seeded by `WORLD_SEED`, the same on every machine) holds:

- 12 towns on a 60 x 60 mile map. Each town lies in a region (hills, river valley, coast,
  forest), exports exactly one of the 12 goods (so a good names its town and back), buys one
  or two goods from the towns that make them, holds its market on one weekday, has a
  landmark, a population and a mayor. Roads join each town to its nearest towns; a road has
  a length in miles and a compass direction.
- 12 goods, each with a unit ("bar of copper") and a fixed price in coins.
- 12 trades, each making one good (a miner makes copper).
- 48 people, 4 per town, each with a trade, an age and sometimes a sibling in another town.

The pretraining corpora (data/tiny_world.py) and the task data of later stages
(data/tiny_tasks.py: instructions, preference pairs, prompts with verifiable answers) all
query this one `World`, so what a model learns in pretraining is what later stages test.
"""

import dataclasses
import functools
import math
import random

WORLD_SEED = 0

_TOWN_NAMES = ("Ashford", "Brackwater", "Coldharbour", "Dunmere", "Elmstead", "Fernhollow",
               "Greywick", "Harrowgate", "Ivybridge", "Larkspur", "Millbrook", "Oakhurst")
# (good, unit, price in coins per unit, trade that makes it)
_GOODS = (("salt", "sack", 4, "saltmaker"), ("copper", "bar", 9, "miner"),
          ("wool", "bale", 5, "shepherd"), ("barley", "sack", 2, "farmer"),
          ("honey", "jar", 3, "beekeeper"), ("timber", "log", 2, "woodcutter"),
          ("cheese", "wheel", 6, "cheesemaker"), ("linen", "bolt", 7, "weaver"),
          ("iron", "bar", 8, "smith"), ("apples", "basket", 2, "grower"),
          ("fish", "barrel", 3, "fisher"), ("candles", "crate", 4, "chandler"))
_REGIONS = ("the hills", "the river valley", "the coast", "the forest")
# Weather by region and season: a model can learn the climate from the chronicle.
_SEASON_NAMES = ("spring", "summer", "autumn", "winter")
_MONTHS = {"spring": ("March", "April", "May"), "summer": ("June", "July", "August"),
           "autumn": ("September", "October", "November"),
           "winter": ("December", "January", "February")}
_CLIMATE = {region: dict(zip(_SEASON_NAMES, weather)) for region, weather in (
    ("the hills", ("cold wind", "clear skies", "early frost", "deep snow")),
    ("the river valley", ("spring floods", "warm sun", "morning mist", "grey rain")),
    ("the coast", ("sea fog", "warm sun", "storms", "salt wind")),
    ("the forest", ("soft rain", "still air", "falling leaves", "hard frost")))}
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_LANDMARKS = ("stone bridge", "old mill", "bell tower", "lighthouse", "great oak", "round well",
              "red gate", "watchtower", "chapel", "clock tower", "windmill", "covered market")
_WOMEN = ("Ada", "Bea", "Cora", "Dina", "Edda", "Fay", "Gwen", "Hana", "Iris", "Jun", "Kira",
          "Lena", "Mira", "Nell", "Orla", "Pia", "Rosa", "Sara", "Tess", "Una", "Vera", "Wren",
          "Yara", "Zoe")
_MEN = ("Abel", "Bran", "Cole", "Dov", "Emil", "Finn", "Gus", "Hugo", "Ivo", "Jon", "Kai",
        "Leo", "Milo", "Ned", "Otto", "Per", "Rafe", "Sam", "Tom", "Ulf", "Vic", "Wim", "Yves",
        "Zeb")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven")


@dataclasses.dataclass(frozen=True)
class Good:
  name: str
  unit: str
  price: int
  trade: str

  def amount(self, count: int) -> str:
    """'1 bar of copper', '3 bars of copper'."""
    return f"{count} {self.unit}{'' if count == 1 else 's'} of {self.name}"


@dataclasses.dataclass(frozen=True)
class Town:
  name: str
  region: str
  x: int
  y: int
  export: str            # the one good this town makes and sells
  imports: tuple         # goods it buys from the towns that make them
  market_day: str
  landmark: str
  population: int
  mayor: str


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  gender: str            # 'f' | 'm'
  town: str
  trade: str
  age: int
  sibling: str | None


@dataclasses.dataclass(frozen=True)
class Road:
  a: str
  b: str
  miles: int


@dataclasses.dataclass(frozen=True)
class World:
  """The facts every tiny-world corpus is generated from; query it, never mutate it."""
  towns: tuple
  goods: tuple
  people: tuple
  roads: tuple

  def town(self, name: str) -> Town:
    return next(t for t in self.towns if t.name == name)

  def good(self, name: str) -> Good:
    return next(g for g in self.goods if g.name == name)

  def person(self, name: str) -> Person:
    return next(p for p in self.people if p.name == name)

  def trade_good(self, trade: str) -> Good:
    return next(g for g in self.goods if g.trade == trade)

  def maker_of(self, good: str) -> Town:
    """The town that exports `good` (each good has exactly one)."""
    return next(t for t in self.towns if t.export == good)

  def people_in(self, town: str) -> list:
    return [p for p in self.people if p.town == town]

  def neighbours(self, town: str) -> list:
    """[(other town, miles)] over the roads from `town`, in road order."""
    return ([(r.b, r.miles) for r in self.roads if r.a == town]
            + [(r.a, r.miles) for r in self.roads if r.b == town])

  def direction(self, src: str, dst: str) -> str:
    """Compass direction from `src` to `dst` by the dominant axis (y grows northward)."""
    a, b = self.town(src), self.town(dst)
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
      return "east" if dx > 0 else "west"
    return "north" if dy > 0 else "south"


@functools.lru_cache(maxsize=4)
def build_world(seed: int = WORLD_SEED) -> World:
  """Builds the world deterministically from `seed` (all corpora use `WORLD_SEED`)."""
  rng = random.Random(f"tiny-world/{seed}")
  goods = tuple(Good(*g) for g in _GOODS)
  exports = rng.sample([g.name for g in goods], len(goods))
  landmarks = rng.sample(_LANDMARKS, len(_LANDMARKS))
  names = [(n, "f") for n in _WOMEN] + [(n, "m") for n in _MEN]
  rng.shuffle(names)
  towns, people = [], []
  for i, town_name in enumerate(_TOWN_NAMES):
    residents = names[4 * i:4 * i + 4]
    # The first resident practises the town's own trade; the others any trade.
    trades = [next(g.trade for g in goods if g.name == exports[i])]
    trades += [rng.choice(goods).trade for _ in range(3)]
    for (name, gender), trade in zip(residents, trades):
      people.append(dict(name=name, gender=gender, town=town_name, trade=trade,
                         age=rng.randint(18, 80), sibling=None))
    imports = tuple(rng.sample([g for g in exports if g != exports[i]], rng.randint(1, 2)))
    towns.append(Town(name=town_name, region=rng.choice(_REGIONS), x=rng.randint(0, 60),
                      y=rng.randint(0, 60), export=exports[i], imports=imports,
                      market_day=rng.choice(_DAYS), landmark=landmarks[i],
                      population=100 * rng.randint(3, 30), mayor=residents[1][0]))
  # Siblings live in different towns so a sibling fact links two towns' people.
  order = rng.sample(range(len(people)), len(people))
  for a, b in zip(order[0::2], order[1::2]):
    if people[a]["town"] != people[b]["town"] and rng.random() < 0.6:
      people[a]["sibling"], people[b]["sibling"] = people[b]["name"], people[a]["name"]
  # Roads: each town to its two nearest towns, plus a chain in name order so all connect.
  miles = lambda s, t: max(1, round(math.hypot(s.x - t.x, s.y - t.y)))
  pairs = set()
  for i, s in enumerate(towns):
    nearest = sorted((miles(s, t), j) for j, t in enumerate(towns) if j != i)[:2]
    pairs |= {tuple(sorted((i, j))) for _, j in nearest}
    if i:
      pairs.add((i - 1, i))
  roads = tuple(Road(towns[i].name, towns[j].name, miles(towns[i], towns[j]))
                for i, j in sorted(pairs))
  return World(towns=tuple(towns), goods=goods, people=tuple(Person(**p) for p in people),
               roads=roads)


def _series(items: list) -> str:
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pronoun(p: Person) -> str:
  return "She" if p.gender == "f" else "He"


def _a(noun: str) -> str:
  return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _where(region: str) -> str:
  return f"{'on' if region == 'the coast' else 'in'} {region}"
