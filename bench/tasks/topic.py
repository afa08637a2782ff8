"""headline_topic: the topic of a news headline, answered with one of five words.

Each topic has its own headline shapes and slot words; a few slot words (numbers, places, "new", "record") are shared
between topics, so the label follows from what the headline is about rather than from a single give-away token.
"""

from __future__ import annotations

import random

PLACES = ["Lisbon", "Nairobi", "Osaka", "Calgary", "Hamburg", "Quito", "Perth", "Krakow", "Accra", "Bergen"]
SLOTS = {
    "team": ["City", "United", "Rovers", "the Hawks", "the Tigers", "Athletic", "the Mariners", "Wanderers"],
    "sport": ["marathon", "cup", "league", "derby", "relay", "tournament", "open"],
    "field": ["astronomers", "physicists", "biologists", "chemists", "geologists", "researchers"],
    "thing": ["a new comet", "a deep-sea microbe", "a faster battery", "an ancient glacier", "a rare isotope",
              "a distant galaxy", "a quantum sensor"],
    "firm": ["a chipmaker", "a carmaker", "a bank", "a retailer", "an airline", "a shipping group", "a brewer"],
    "money": ["profits", "shares", "sales", "revenue", "bond yields", "prices"],
    "condition": ["flu", "asthma", "diabetes", "heart disease", "migraines", "insomnia", "allergies"],
    "care": ["a new vaccine", "a daily walk", "less sugar", "a blood test", "more sleep", "a nasal spray"],
    "trip": ["night trains", "ferry routes", "budget flights", "mountain trails", "city passes", "beach resorts"],
    "verb_up": ["rise", "jump", "climb", "surge"],
    "verb_down": ["fall", "slide", "slump", "drop"],
}
HEADLINES = {
    "sport": ["{team} beat {team2} {a}-{b} to reach the {sport} final",
              "{Place} {sport} ends in a {a}-{b} draw after extra time",
              "Injury keeps {team} captain out of the {sport} for {a} weeks",
              "Record crowd of {n},000 watches {team} win the {sport}"],
    "science": ["{Field} in {Place} report {thing}",
                "New telescope data lets {field} map {thing}",
                "{Field} measure {thing} for the first time",
                "Study of {n} samples leads {field} to {thing}"],
    "business": ["{Money} {verb_up} {a}% as {firm} in {Place} beats forecasts",
                 "{Money} {verb_down} {a}% after {firm} warns on costs",
                 "{Firm} to cut {n}00 jobs in {Place}",
                 "{Firm} agrees {n} billion takeover of a rival"],
    "health": ["Doctors link {care} to fewer cases of {condition}",
               "{Condition} cases {verb_up} {a}% in {Place} this winter",
               "Trial of {n},000 patients finds {care} eases {condition}",
               "Clinics in {Place} offer {care} to people with {condition}"],
    "travel": ["{Trip} from {Place} return after {a} years",
               "Tourists flock to {Place} as {trip} reopen",
               "{Place} caps visitor numbers at {n},000 a day",
               "New {trip} link {Place} and {Place2} from spring"],
}
INSTRUCTION = ("What is the topic of this headline: sport, science, business, health or travel? "
               "Answer with one word.")


def _fill(shape: str, rng: random.Random) -> str:
    values = {k: rng.choice(v) for k, v in SLOTS.items()}
    values.update(team2=rng.choice([t for t in SLOTS["team"] if t != values["team"]]),
                  place=rng.choice(PLACES), place2=rng.choice(PLACES), a=rng.randint(1, 9), b=rng.randint(0, 9),
                  n=rng.randint(2, 95))
    values.update({k[0].upper() + k[1:]: str(v)[0].upper() + str(v)[1:] for k, v in list(values.items())})
    text = shape.format(**values)
    return text[0].upper() + text[1:]  # "the Hawks beat ..." opens a headline as "The Hawks beat ..."


def example(rng: random.Random) -> dict:
    label = rng.choice(list(HEADLINES))
    headline = _fill(rng.choice(HEADLINES[label]), rng)
    return {"prompt": f"{INSTRUCTION}\n\n{headline}", "completion": label}
