"""A seeded generator of news-like documents with one-sentence reference summaries.

Each document reports one event (several facts about invented people, organisations
and places), mixed with distractor sentences that are not in the summary. The summary
states the event plus 0-3 of its details, so reference lengths vary from ~8 to ~30
words (the length-reward experiment needs varied lengths). Document lengths vary too.

`example(index, seed, split)` is a pure function of its arguments (Python's `random`
seeded with a string, which is stable across Python versions), so any number of
examples can be drawn, in any order, and split s of seed k is always the same data.
"""
from __future__ import annotations

import random
from typing import Callable

from deranj.data.corpora import SummaryExample

SPLITS = ("train", "validation", "test")

_FIRST = ("Anna Ben Carla David Elena Farid Grace Hugo Ines James Keiko Liam Maya Nikos Omar "
          "Priya Quentin Rosa Samuel Tara Umar Vera Walter Xin Yusuf Zoe").split()
_LAST = ("Abbott Baker Chen Dlamini Evans Fischer Garcia Haddad Ito Jensen Kowalski Lopez "
         "Mensah Novak Okafor Petrov Quinn Rossi Singh Tanaka Ulloa Varga Walsh Young "
         "Zimmer").split()
_TOWN_START = "Ash Bel Carr Dun Elm Fair Glen Hol Kings Lang Mill North Oak Red Stan Wick".split()
_TOWN_END = "bridge bury field ford ham haven mouth ton vale wood".split()
_ORG_ADJ = "National Regional Northern Coastal United Central Western Eastern Royal".split()
_ORG_NOUN = "Health Water Rail Energy Farming Transport Housing Science Arts Mining".split()
_ORG_KIND = "Council Authority Company Trust Institute Union Board".split()
_ROLES = "chief executive,chair,spokeswoman,spokesman,director,mayor,minister".split(",")
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_FACILITIES = ("hospital,bridge,school,library,wind farm,railway station,water treatment plant,"
               "sports centre").split(",")
_TEAMS = "Rovers,Wanderers,City,United,Athletic,Harriers,Rangers,Albion".split(",")
_SPORTS = "football,rugby,netball,hockey,cricket".split(",")
_PRODUCTS = "electric bus,smartphone,vaccine,tractor,solar panel,satellite".split(",")

_DISTRACTORS = (
    "Temperatures in the region are expected to stay mild for the rest of the week.",
    "Elsewhere, a local bakery in {town} celebrated its fiftieth anniversary.",
    "The announcement came on the same day as a separate report on regional transport.",
    "Officials said more information would be published on their website in due course.",
    "A farmers' market will be held in the town square on {day}, organisers said.",
    "Traffic on the main road into {town} was slower than usual because of roadworks.",
    "The local football club is due to play its next home game on {day}.",
    "Residents have been invited to a public meeting at the community hall.",
    "A new cycle path between {town} and the coast opened last month.",
    "The council's annual budget will be debated by members in {month}.",
    "Heavy rain is forecast for parts of the north later in the week.",
    "Schools in the area return from their holidays next {day}.",
)


class _Draw:
  """Named draws from one seeded `random.Random`."""

  def __init__(self, rng: random.Random):
    self.rng = rng

  def pick(self, options):
    return self.rng.choice(options)

  def person(self) -> str:
    return f"{self.pick(_FIRST)} {self.pick(_LAST)}"

  def town(self) -> str:
    return self.pick(_TOWN_START) + self.pick(_TOWN_END)

  def org(self) -> str:
    return f"the {self.pick(_ORG_ADJ)} {self.pick(_ORG_NOUN)} {self.pick(_ORG_KIND)}"

  def number(self, low: int, high: int) -> int:
    return self.rng.randint(low, high)


def _cap(sentence: str) -> str:
  return sentence[0].upper() + sentence[1:]


# Each event returns (document sentences, summary clause, detail clauses). Details are
# facts stated in the document; the summary appends a random subset of them.
_Event = Callable[[_Draw], tuple[list[str], str, list[str]]]


def _construction(d: _Draw):
  org, town, facility = d.org(), d.town(), d.pick(_FACILITIES)
  cost, jobs, year = d.number(5, 900), d.number(20, 600), d.number(2025, 2032)
  person, role = d.person(), d.pick(_ROLES)
  doc = [f"{_cap(org)} has confirmed that a new {facility} will be built in {town}.",
         f"The project is expected to cost about {cost} million pounds.",
         f"{person}, the {role} of {org}, said the {facility} would create {jobs} jobs.",
         f"Work is due to be finished by {year}.",
         f"\"This is a great day for {town},\" {person} said."]
  return doc, f"A new {facility} is to be built in {town}", [
      f"at a cost of about {cost} million pounds", f"creating {jobs} jobs",
      f"with work due to finish by {year}"]


def _resignation(d: _Draw):
  person, role, org = d.person(), d.pick(_ROLES), d.org()
  day, years, successor = d.pick(_DAYS), d.number(2, 25), d.person()
  reason = d.pick(["health reasons", "a row over funding", "family reasons",
                   "criticism of a failed project"])
  doc = [f"{person} has resigned as {role} of {org}.",
         f"{person} announced the decision on {day}, citing {reason}.",
         f"{person} had been in the post for {years} years.",
         f"{successor} will take over on an interim basis."]
  return doc, f"The {role} of {org}, {person}, has resigned", [
      f"citing {reason}", f"after {years} years in the post",
      f"with {successor} taking over for now"]


def _flood(d: _Draw):
  town, homes, river = d.town(), d.number(10, 400), d.town() + " river"
  day, rain, person = d.pick(_DAYS), d.number(30, 160), d.person()
  doc = [f"Flooding has forced the evacuation of {homes} homes in {town}.",
         f"The {river} burst its banks on {day} after {rain} millimetres of rain fell in "
         f"two days.",
         f"Emergency crews worked through the night to move residents to safety.",
         f"{person}, a resident, said the water rose faster than anyone expected."]
  return doc, f"{homes} homes in {town} have been evacuated because of flooding", [
      f"after the {river} burst its banks", f"following {rain} millimetres of rain",
      f"on {day}"]


def _match(d: _Draw):
  town_a, town_b = d.town(), d.town()
  team_a, team_b = f"{town_a} {d.pick(_TEAMS)}", f"{town_b} {d.pick(_TEAMS)}"
  sport, goals_a, goals_b = d.pick(_SPORTS), d.number(2, 6), d.number(0, 1)
  scorer, crowd = d.person(), d.number(2, 40) * 1000
  doc = [f"{team_a} beat {team_b} {goals_a}-{goals_b} in the regional {sport} cup final.",
         f"{scorer} scored twice in the second half.",
         f"A crowd of {crowd} watched the match.",
         f"It is the first time {team_a} have won the cup."]
  return doc, f"{team_a} won the regional {sport} cup final", [
      f"beating {team_b} {goals_a}-{goals_b}", f"with two goals from {scorer}",
      f"in front of {crowd} fans"]


def _results(d: _Draw):
  org, profit, pct = d.org(), d.number(2, 300), d.number(3, 45)
  month, person, product = d.pick(_MONTHS), d.person(), d.pick(_PRODUCTS)
  up = d.pick([True, False])
  change = "rose" if up else "fell"
  doc = [f"{_cap(org)} made a profit of {profit} million pounds in the year to {month}.",
         f"Profits {change} by {pct} percent compared with the year before.",
         f"Sales of its new {product} were a key factor, the company said.",
         f"{person}, the chief executive, said the results were \"encouraging\"."]
  return doc, f"Profits at {org} {change} by {pct} percent", [
      f"to {profit} million pounds", f"in the year to {month}",
      f"with sales of its new {product} a key factor"]


def _launch(d: _Draw):
  org, product, town = d.org(), d.pick(_PRODUCTS), d.town()
  price, units, month = d.number(50, 900), d.number(2, 90) * 100, d.pick(_MONTHS)
  person = d.person()
  doc = [f"{_cap(org)} has unveiled a new {product} designed in {town}.",
         f"It will go on sale in {month} for {price} pounds.",
         f"The organisation plans to make {units} of them in the first year.",
         f"{person}, who led the design team, said it had taken three years to develop."]
  return doc, f"{_cap(org)} has unveiled a new {product}", [
      f"designed in {town}", f"which goes on sale in {month}", f"priced at {price} pounds"]


_EVENTS: tuple[_Event, ...] = (_construction, _resignation, _flood, _match, _results, _launch)


def example(index: int, seed: int = 0, split: str = "train") -> SummaryExample:
  """The `index`-th example of `split` under `seed` (pure function of the three)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}.")
  if index < 0:
    raise ValueError(f"index={index} must be >= 0.")
  d = _Draw(random.Random(f"deranj.synthetic/{seed}/{split}/{index}"))
  doc, headline, details = d.pick(_EVENTS)(d)
  chosen = d.rng.sample(details, d.number(0, len(details)))
  summary = headline + "".join(f", {c}" for c in chosen) + "."
  # Distractors go anywhere after the opening sentence.
  town, day, month = d.town(), d.pick(_DAYS), d.pick(_MONTHS)
  for sentence in d.rng.sample(_DISTRACTORS, d.number(1, 6)):
    position = d.number(1, len(doc))
    doc.insert(position, sentence.format(town=town, day=day, month=month))
  return SummaryExample(document=" ".join(doc), summary=_cap(summary),
                        source=f"synthetic:{seed}:{split}:{index}")


def examples(num_examples: int, seed: int = 0, split: str = "train",
             start: int = 0) -> list[SummaryExample]:
  """Examples start, ..., start + num_examples - 1 of `split` under `seed`."""
  return [example(i, seed, split) for i in range(start, start + num_examples)]
