"""The COCO object vocabulary of CHAIR (Rohrbach et al., 2018), as data.

``COCO_CATEGORIES`` are COCO's 80 detection categories in their official order (category ids 1..90 with
gaps; the names are what ``instances_*.json`` calls them). ``COCO_SYNONYMS`` maps each category to the
words that count as a mention of it: the synonym table that the CHAIR release ships as
``data/synonyms.txt`` (github.com/LisaAnne/Hallucination), one line per category, the category name first.
Changes made here to that table, none of which changes which category a word maps to: duplicate entries
are dropped and "iPhone" is written lower-case (the release lower-cases the caption but not the table, so
its "iPhone" entry could never match). Its misspellings ("televison", "solider", "phon", "knive") are kept:
they are in the release and models do write them.

``COCO_PHRASES`` are the word pairs that CHAIR reads as one unit before looking words up (its
``coco_double_words``, the "baby"/"adult" animal, "passenger" vehicle, "bow tie" and "toilet seat" rules),
each mapped to the word it stands for, or to itself. A phrase whose word is not in the vocabulary ("home
plate", "adult animal") simply consumes its two words, so "home plate" never counts as anything and "baby
cub" does not count "baby" as a person. All multi-word synonyms are phrases too ("dining table", the
three-word "stove top oven", which the release's two-word loop can never match; both give the same category
as the release through their last word).
"""
from __future__ import annotations

COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# One line per category: "category: synonym, synonym, ..." (the category is a synonym of itself).
_SYNONYM_TABLE = """
person: girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger,
 sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father,
 gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker,
 trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief,
 buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle: bike, unicycle, minibike, trike
car: automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle: scooter, motor bike, motor cycle, motorbike, moped
airplane: jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus: minibus, trolley
train: locomotive, tramway, caboose
truck: pickup, lorry, hauler, firetruck
boat: ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran,
 pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard,
 paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light: street light, traffic signal, stop light, streetlight, stoplight
fire hydrant: hydrant
stop sign:
parking meter:
bench: pew
bird: ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard,
 finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail,
 bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling,
 waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock,
 cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat: kitten, feline, tabby
dog: puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier,
 poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker,
 greyhound, retriever, brindle, hound, whippet, husky
horse: colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep: lamb, ram, goat, ewe
cow: cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant:
bear: panda
zebra:
giraffe:
backpack: knapsack
umbrella:
handbag: wallet, purse, briefcase
tie: bow, bow tie
suitcase: suit case, luggage
frisbee:
skis: ski
snowboard:
sports ball: ball
kite:
baseball bat:
baseball glove:
skateboard:
surfboard: longboard, skimboard, shortboard, wakeboard
tennis racket: racket
bottle:
wine glass:
cup:
fork:
knife: pocketknife, knive
spoon:
bowl: container
banana:
apple:
sandwich: burger, sub, cheeseburger, hamburger
orange:
broccoli:
carrot:
hot dog:
pizza:
donut: doughnut, bagel
cake: cheesecake, cupcake, shortcake, coffeecake, pancake
chair: seat, stool
couch: sofa, recliner, futon, loveseat, settee, chesterfield
potted plant: houseplant
bed:
dining table: table, desk
toilet: urinal, commode, lavatory, potty
tv: monitor, televison, television
laptop: computer, notebook, netbook, lenovo, macbook, laptop computer
mouse:
remote:
keyboard:
cell phone: mobile phone, phone, cellphone, telephone, phon, smartphone, iphone
microwave:
oven: stovetop, stove, stove top oven
toaster:
sink:
refrigerator: fridge, freezer
book:
clock:
vase:
scissors:
teddy bear: teddybear
hair drier: hairdryer
toothbrush:
"""


def _parse_table(table: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for line in table.replace("\n ", " ").strip().splitlines():
        head, _, rest = line.partition(":")
        words = [head.strip()] + [w.strip() for w in rest.split(",") if w.strip()]
        out[head.strip()] = tuple(dict.fromkeys(words))
    return out


COCO_SYNONYMS: dict[str, tuple[str, ...]] = _parse_table(_SYNONYM_TABLE)

# Word pairs read as one unit (CHAIR's double words and special cases) -> the word they stand for.
COCO_PHRASES: dict[str, str] = {
    **{p: p for p in (
        "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
        "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat",
        "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
        "hair drier", "potted plant", "laptop computer", "stove top oven", "home plate", "dining table")},
    # qualifiers that would otherwise fire "person" (baby, adult, passenger) are absorbed by the noun
    **{f"{q} {a}": a for q in ("baby", "adult") for a in (
        "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")},
    **{f"passenger {v}": v for v in ("jet", "train")},
    "bow tie": "tie",
    "toilet seat": "toilet",
}

assert tuple(COCO_SYNONYMS) == COCO_CATEGORIES, "the synonym table must list the 80 categories in order"
