"""Curated vocabulary of the offline ``template`` refiner (a stand-in for the paper's ChatGPT).

The template backend finds known words of a coarse prompt and replaces each with a fine-grained
phrase from the tables below. All tables are plain data, and :data:`TABLES_DIGEST` hashes them,
so editing any entry changes the cache key of every refinement (stale cache entries are never
reused).

Matching rules (implemented in :mod:`engine.refine.template`):

* Text is lower-cased and split into words (``t-shirt`` and ``polka-dot`` are one word). Keys are
  words or space-separated phrases; at each position the longest phrase wins ("tank top"), and a
  key also matches its plural ("dresses", "shirts").
* :data:`ALIASES` maps synonyms to the canonical key of one of the tables.
* A garment takes the colours, shades, materials and patterns written right before it ("a dark
  blue silk dress"); without them it keeps its own default colour and material. Colours written
  right before "hair" or "eyes" describe the hair or eyes instead.
* A top without a bottom (or the reverse) gets the garment's ``pair``; an outfit without shoes gets
  the ``shoes`` of its main garment. With no garment at all, :data:`DEFAULT_OUTFIT` is used, in the
  colour of an "in red" / "wearing red" phrase if there is one.
* The first subject word sets the person noun and gender (used for default hair); the action of
  the highest-priority :data:`ACTIONS` key wins ("ballet" before "dancing"), default "dancing".
* A scene key gives the setting and default light; :data:`LIGHTING` words replace that light.
"""

from __future__ import annotations

import hashlib
import json
from typing import NamedTuple


class Garment(NamedTuple):
    """One garment: where it sits on the body and how it is described."""

    slot: str
    """``full`` (dress, suit), ``top``, ``outer``, ``bottom``, ``feet`` or ``accessory``."""
    template: str
    """Fine-grained phrase with ``{colour}`` and ``{material}`` placeholders."""
    colour: str
    """Default colour when the prompt names none."""
    material: str
    """Default material when the prompt names none."""
    pair: str
    """Garment key added when the complementary slot is missing (top ↔ bottom), or ""."""
    shoes: str
    """Footwear added when the outfit has none and this is its main garment, or ""."""


# fmt: off
_G = Garment
GARMENTS: dict[str, Garment] = {
    # full-body garments
    "dress": _G("full", "a flowing {colour} {material} midi dress with thin straps, fitted waist",
                "red", "silk", "", "strappy heeled sandals"),
    "gown": _G("full", "an elegant floor-length {colour} {material} gown with a fitted bodice",
               "black", "satin", "", "pointed heels"),
    "sundress": _G("full", "a light {colour} {material} sundress with a flared skirt",
                   "yellow", "cotton", "", "flat leather sandals"),
    "suit": _G("full", "a sharp tailored {colour} {material} two-piece suit over a crisp white "
               "shirt", "charcoal grey", "wool", "", "polished black oxford shoes"),
    "tuxedo": _G("full", "a classic {colour} {material} tuxedo with satin lapels and a bow tie",
                 "black", "wool", "", "patent leather shoes"),
    "kimono": _G("full", "a traditional {colour} {material} kimono with floral patterns and a "
                 "wide obi sash", "red", "silk", "", "white tabi socks and wooden geta sandals"),
    "hanbok": _G("full", "a traditional {colour} {material} hanbok with a high-waisted full skirt",
                 "pink", "silk", "", "embroidered flat shoes"),
    "qipao": _G("full", "a form-fitting {colour} {material} qipao with a mandarin collar and gold "
                "embroidery", "red", "silk brocade", "", "black heels"),
    "sari": _G("full", "a {colour} {material} sari draped over one shoulder with a gold border",
               "magenta", "silk", "", "embellished flat sandals"),
    "jumpsuit": _G("full", "a {colour} {material} wide-leg jumpsuit with a belted waist",
                   "black", "crepe", "", "block heels"),
    "tracksuit": _G("full", "a {colour} {material} tracksuit with white side stripes",
                    "navy blue", "polyester", "", "white running sneakers"),
    "leotard": _G("full", "a {colour} {material} long-sleeve leotard", "black", "stretch lycra",
                  "", "ballet shoes"),
    "tutu": _G("full", "a {colour} ballet tutu with a layered {material} skirt and fitted bodice",
               "white", "tulle", "", "pink satin pointe shoes"),
    # tops
    "shirt": _G("top", "a crisp {colour} {material} button-up shirt with rolled sleeves",
                "white", "cotton", "trousers", "brown leather loafers"),
    "t-shirt": _G("top", "a fitted {colour} {material} crew-neck t-shirt", "white", "cotton",
                  "jeans", "white canvas sneakers"),
    "blouse": _G("top", "a loose {colour} {material} blouse with puffed sleeves", "cream",
                 "chiffon", "skirt", "ballet flats"),
    "tank top": _G("top", "a {colour} ribbed {material} tank top", "black", "cotton", "shorts",
                   "white sneakers"),
    "crop top": _G("top", "a {colour} {material} crop top", "white", "cotton", "jeans",
                   "chunky sneakers"),
    "sweater": _G("top", "a cozy {colour} cable-knit {material} sweater", "grey", "wool",
                  "jeans", "suede ankle boots"),
    "hoodie": _G("top", "an oversized {colour} {material} hoodie with drawstrings", "grey",
                 "cotton fleece", "sweatpants", "chunky white sneakers"),
    # outerwear (worn over a top)
    "jacket": _G("outer", "a tailored {colour} {material} jacket with a sharp collar", "black",
                 "leather", "t-shirt", "black ankle boots"),
    "blazer": _G("outer", "a structured {colour} {material} blazer", "navy blue", "wool",
                 "shirt", "leather loafers"),
    "coat": _G("outer", "a long {colour} {material} overcoat with wide lapels", "camel", "wool",
               "sweater", "leather knee boots"),
    "trench coat": _G("outer", "a belted {colour} {material} trench coat", "beige", "gabardine",
                      "shirt", "leather ankle boots"),
    # bottoms
    "skirt": _G("bottom", "a pleated {colour} {material} knee-length skirt", "black", "chiffon",
                "blouse", "ballet flats"),
    "jeans": _G("bottom", "{colour} slim-fit {material} jeans with subtle fading", "blue",
                "denim", "t-shirt", "white sneakers"),
    "trousers": _G("bottom", "tailored {colour} {material} trousers with a straight leg",
                   "black", "wool", "shirt", "leather loafers"),
    "shorts": _G("bottom", "{colour} {material} shorts", "beige", "cotton", "t-shirt",
                 "white sneakers"),
    "leggings": _G("bottom", "{colour} high-waisted {material} leggings", "black", "stretch",
                   "tank top", "running shoes"),
    "sweatpants": _G("bottom", "{colour} {material} jogger sweatpants", "grey", "cotton fleece",
                     "hoodie", "chunky white sneakers"),
    # footwear
    "sneakers": _G("feet", "{colour} {material} sneakers", "white", "canvas", "", ""),
    "boots": _G("feet", "{colour} {material} ankle boots", "black", "leather", "", ""),
    "heels": _G("feet", "{colour} {material} high heels", "black", "patent leather", "", ""),
    "sandals": _G("feet", "{colour} {material} strappy sandals", "tan", "leather", "", ""),
    "shoes": _G("feet", "{colour} {material} shoes", "black", "leather", "", ""),
    # accessories
    "hat": _G("accessory", "a {colour} {material} wide-brim hat", "beige", "straw", "", ""),
    "cap": _G("accessory", "a {colour} {material} baseball cap", "black", "cotton", "", ""),
    "scarf": _G("accessory", "a {colour} {material} scarf", "cream", "cashmere", "", ""),
}
"""Garment key → :class:`Garment`."""

DEFAULT_OUTFIT: tuple[str, ...] = ("t-shirt", "jeans")
"""Garments used when the prompt names none (the first takes an "in <colour>" colour)."""

SLOT_ORDER: tuple[str, ...] = ("full", "top", "outer", "bottom", "feet", "accessory")
"""Order of the garments in the clothes description."""

COLOURS: dict[str, str] = {
    "red": "red", "crimson": "crimson", "scarlet": "scarlet", "burgundy": "burgundy",
    "maroon": "maroon", "pink": "pink", "magenta": "magenta", "coral": "coral",
    "orange": "orange", "yellow": "yellow", "mustard": "mustard yellow", "gold": "golden",
    "golden": "golden", "green": "green", "emerald": "emerald green", "olive": "olive green",
    "mint": "mint green", "teal": "teal", "turquoise": "turquoise", "blue": "blue",
    "navy": "navy blue", "cobalt": "cobalt blue", "purple": "purple", "violet": "violet",
    "lavender": "lavender", "lilac": "lilac", "brown": "brown", "tan": "tan", "camel": "camel",
    "beige": "beige", "khaki": "khaki", "cream": "cream", "ivory": "ivory", "white": "white",
    "black": "black", "grey": "grey", "gray": "grey", "charcoal": "charcoal grey",
    "silver": "silver", "rainbow": "rainbow-coloured",
}
"""Colour word → colour phrase."""

SHADES: dict[str, str] = {
    "light": "light", "dark": "dark", "pale": "pale", "bright": "bright", "deep": "deep",
    "pastel": "pastel", "neon": "neon", "hot": "hot", "baby": "baby",
}
"""Shade word (only before a colour) → phrase."""

MATERIALS: dict[str, str] = {
    "silk": "silk", "silky": "silk", "satin": "satin", "cotton": "cotton", "linen": "linen",
    "wool": "wool", "woolen": "wool", "leather": "leather", "denim": "denim",
    "velvet": "velvet", "lace": "lace", "chiffon": "chiffon", "knit": "knit", "knitted": "knit",
    "fleece": "fleece", "suede": "suede", "tulle": "tulle", "cashmere": "cashmere",
    "corduroy": "corduroy", "sequin": "sequined", "sequined": "sequined", "sparkly": "sequined",
    "glittery": "sequined",
}
"""Material word → material phrase (replaces the garment's default material)."""

PATTERNS: dict[str, str] = {
    "striped": "striped", "floral": "floral-print", "plaid": "plaid", "checkered": "checkered",
    "polka-dot": "polka-dot", "embroidered": "embroidered", "tie-dye": "tie-dye",
    "leopard": "leopard-print",
}
"""Pattern word → phrase (placed after the colour)."""

FILLERS: frozenset[str] = frozenset({
    "long", "short", "tight", "loose", "oversized", "little", "flowing", "elegant", "beautiful",
    "new", "fancy", "simple", "cute", "casual", "formal", "pretty", "stylish", "and",
})
"""Words allowed between a garment's modifiers and the garment, otherwise ignored."""

SUBJECTS: dict[str, tuple[str, str]] = {
    "woman": ("woman", "female"), "lady": ("woman", "female"), "female": ("woman", "female"),
    "girl": ("girl", "female"), "ballerina": ("ballerina", "female"),
    "man": ("man", "male"), "guy": ("man", "male"), "gentleman": ("man", "male"),
    "male": ("man", "male"), "boy": ("boy", "male"),
    "person": ("person", ""), "dancer": ("dancer", ""), "someone": ("person", ""),
    "child": ("child", ""), "kid": ("child", ""), "teenager": ("teenager", ""),
}
"""Person word → (noun used in the frame prompt, gender: "female", "male" or "")."""

ACTIONS: dict[str, str] = {
    "ballet": "dancing ballet", "hip-hop": "dancing hip-hop", "salsa": "dancing salsa",
    "tango": "dancing tango", "waltz": "dancing a waltz", "breakdancing": "breakdancing",
    "dancing": "dancing", "spinning": "spinning", "twirling": "twirling", "jumping": "jumping",
    "running": "running", "jogging": "jogging", "walking": "walking", "waving": "waving",
    "stretching": "stretching", "yoga": "doing yoga", "kicking": "kicking", "boxing": "boxing",
    "singing": "singing", "performing": "performing", "posing": "posing",
    "standing": "standing",
}
"""Action word → phrase, in priority order (the earliest key found wins)."""

DEFAULT_ACTION = "dancing"
"""Action when the prompt names none (this is a dancing-avatar engine)."""

HAIR_WORDS: dict[str, str] = {
    "blonde": "golden blonde", "blond": "golden blonde", "brunette": "dark brown",
    "redhead": "copper red", "ginger": "copper red", "auburn": "auburn",
    "platinum": "platinum blonde",
}
"""Words that name a hair colour wherever they appear → hair colour phrase."""

HAIR_COLOURS: dict[str, str] = {
    "red": "copper red", "black": "jet black", "brown": "chestnut brown", "white": "snow white",
    "grey": "silver grey", "gray": "silver grey", "silver": "silver", "pink": "pastel pink",
    "blue": "bright blue", "purple": "violet", "green": "emerald green",
}
"""Colour word written right before "hair" → hair colour phrase (else :data:`COLOURS`)."""

HAIR_LENGTHS: dict[str, str] = {
    "short": "short", "long": "long", "shoulder-length": "shoulder-length",
    "medium": "shoulder-length", "cropped": "cropped",
}
"""Length word right before "hair" → phrase."""

HAIR_TEXTURES: dict[str, str] = {
    "curly": "voluminous curly", "wavy": "soft wavy", "straight": "sleek straight",
    "messy": "tousled", "frizzy": "frizzy", "braided": "braided",
}
"""Texture word → phrase (only right before "hair", except :data:`HAIR_TEXTURES_ANYWHERE`)."""

HAIR_TEXTURES_ANYWHERE: frozenset[str] = frozenset({"curly", "wavy", "frizzy"})
"""Texture words that describe the hair wherever they appear ("a curly blonde girl")."""

HAIR_STYLES: dict[str, str] = {
    "ponytail": "tied back in a sleek high ponytail", "bun": "pulled up in a neat bun",
    "braids": "in long braids", "pigtails": "in two pigtails", "afro": "in a rounded afro",
    "dreadlocks": "in shoulder-length dreadlocks", "bob cut": "cut in a chin-length bob",
    "pixie cut": "in a short pixie cut", "buzz cut": "in a buzz cut", "mohawk": "in a mohawk",
}
"""Hairstyle word or phrase → phrase appended to the hair description."""

HAIR_DEFAULTS: dict[str, tuple[str, str, str]] = {
    "female": ("long", "soft wavy", "chestnut brown"),
    "male": ("short", "neatly styled", "dark brown"),
    "": ("shoulder-length", "", "brown"),
}
"""Gender → default (length, texture, colour) of the hair, for the parts the prompt omits."""

FACE_FEATURES: dict[str, str] = {
    "beard": "a neatly trimmed beard", "bearded": "a neatly trimmed beard",
    "moustache": "a groomed moustache", "mustache": "a groomed moustache",
    "stubble": "light stubble", "glasses": "thin round glasses", "sunglasses": "dark sunglasses",
    "freckles": "light freckles across the nose", "freckled": "light freckles across the nose",
    "makeup": "subtle natural makeup", "lipstick": "glossy lipstick",
    "earrings": "small gold earrings", "dimples": "soft dimples",
}
"""Face feature word → phrase."""

EXPRESSIONS: dict[str, str] = {
    "smiling": "a warm genuine smile", "smile": "a warm genuine smile",
    "happy": "a warm genuine smile", "cheerful": "a warm genuine smile",
    "joyful": "a warm genuine smile", "laughing": "a joyful laugh",
    "serious": "a calm serious expression", "sad": "a wistful expression",
    "confident": "a confident expression", "fierce": "an intense fierce expression",
}
"""Expression word → phrase (default: :data:`DEFAULT_EXPRESSION`)."""

DEFAULT_EXPRESSION = "a relaxed natural expression"

AGES: dict[str, str] = {
    "old man": "mature face with fine smile lines",
    "old woman": "mature face with fine smile lines",
    "elderly": "mature face with fine smile lines",
    "senior": "mature face with fine smile lines", "middle-aged": "middle-aged face",
    "young": "youthful face", "teenage": "youthful face", "youthful": "youthful face",
}
"""Age word → face phrase."""

SCENES: dict[str, tuple[str, str]] = {
    "beach": ("sunny sandy beach with turquoise sea and gentle waves, clear blue sky",
              "soft daylight"),
    "street": ("busy city street with shop fronts and parked cars", "natural daylight"),
    "stage": ("theater stage with red velvet curtains and a polished wooden floor",
              "dramatic spotlights"),
    "studio": ("clean photo studio with a seamless light grey backdrop",
               "soft even studio lighting"),
    "dance studio": ("bright dance studio with a wooden floor, wall mirrors and a ballet barre",
                     "soft window light"),
    "forest": ("lush green forest with tall trees, ferns and a mossy path",
               "dappled sunlight through the leaves"),
    "city": ("modern city square surrounded by glass skyscrapers", "bright daylight"),
    "park": ("green city park with a lawn, trees and a winding path", "warm afternoon sunlight"),
    "room": ("cozy room with a wooden floor, plants and a large window", "warm indoor light"),
    "living room": ("modern living room with a sofa, a rug and plants", "warm indoor light"),
    "bedroom": ("tidy bedroom with a made bed and fairy lights", "warm lamp light"),
    "kitchen": ("bright modern kitchen with marble counters", "natural window light"),
    "office": ("open-plan office with desks and large windows", "cool daylight"),
    "nightclub": ("crowded nightclub dance floor with a DJ booth",
                  "colourful neon lights and haze"),
    "disco": ("retro disco with a mirror ball and a lit dance floor", "colourful party lights"),
    "ballroom": ("grand ballroom with crystal chandeliers and a marble floor", "warm golden light"),
    "desert": ("vast desert with rolling sand dunes", "harsh bright sunlight"),
    "mountain": ("rocky mountain summit overlooking a green valley", "crisp clear daylight"),
    "garden": ("blooming flower garden with hedges and a stone path", "soft morning sunlight"),
    "rooftop": ("city rooftop terrace with a skyline view", "golden-hour light"),
    "gym": ("modern gym with mirrors and training equipment", "bright overhead lighting"),
    "classroom": ("classroom with wooden desks and a chalkboard", "soft daylight"),
    "cafe": ("cozy cafe with wooden tables and hanging lamps", "warm ambient light"),
    "library": ("quiet library with tall bookshelves", "warm reading-lamp light"),
    "subway": ("subway station platform with tiled walls", "fluorescent lighting"),
    "meadow": ("wide green meadow with wildflowers", "soft sunlight"),
    "lake": ("calm lakeshore with mountains reflected in the water", "soft daylight"),
    "river": ("grassy riverbank with a gently flowing river", "soft daylight"),
    "pool": ("outdoor swimming pool with blue water and deck chairs", "bright summer sunlight"),
    "temple": ("ancient stone temple courtyard", "soft warm light"),
    "castle": ("medieval castle courtyard with stone walls", "soft overcast light"),
    "alley": ("narrow graffiti-covered alley", "moody side light"),
    "concert": ("concert stage with a large LED screen and a cheering crowd",
                "colourful stage lights"),
    "party": ("lively house party with string lights", "warm party lights"),
    "wedding": ("elegant wedding venue with white flowers and an arch", "soft warm light"),
    "hall": ("spacious hall with high ceilings and a polished floor", "soft ambient light"),
    "museum": ("modern art museum gallery with white walls", "soft gallery lighting"),
    "train station": ("busy train station with a glass roof", "diffuse daylight"),
}
"""Scene word or phrase → (setting, default lighting)."""

DEFAULT_SCENE: tuple[str, str] = SCENES["studio"]
"""Scene used when the prompt names none."""

LIGHTING: dict[str, str] = {
    "sunset": "warm golden-hour sunset light", "sunrise": "soft pink sunrise light",
    "dawn": "soft pink sunrise light", "dusk": "blue-hour twilight",
    "twilight": "blue-hour twilight",
    "night": "at night, lit by soft moonlight and warm lamps", "neon": "vivid neon lighting",
    "rain": "light rain, wet reflective ground, overcast sky", "rainy": "light rain, wet "
    "reflective ground, overcast sky", "snow": "gently falling snow, soft diffuse winter light",
    "snowy": "gently falling snow, soft diffuse winter light", "fog": "soft fog and haze",
    "foggy": "soft fog and haze", "misty": "soft fog and haze", "sunny": "bright sunshine",
    "spotlight": "a single dramatic spotlight", "morning": "soft morning light",
    "evening": "warm evening light", "cloudy": "soft overcast light",
    "overcast": "soft overcast light", "candlelight": "warm candlelight",
}
"""Lighting word → phrase (replaces the scene's default lighting)."""

ALIASES: dict[str, str] = {
    # garments
    "tshirt": "t-shirt", "tee": "t-shirt", "tee-shirt": "t-shirt", "jumper": "sweater",
    "pullover": "sweater", "cardigan": "sweater",
    "hoody": "hoodie", "sweatshirt": "hoodie", "overcoat": "coat", "raincoat": "trench coat",
    "pants": "trousers", "slacks": "trousers", "miniskirt": "skirt", "mini skirt": "skirt",
    "evening gown": "gown", "ball gown": "gown", "cheongsam": "qipao", "saree": "sari",
    "sneaker": "sneakers", "trainers": "sneakers", "boot": "boots", "high heels": "heels",
    "joggers": "sweatpants", "tights": "leggings", "beanie": "cap", "baseball cap": "cap",
    # subjects and actions
    "women": "woman", "men": "man", "girls": "girl", "boys": "boy", "people": "person",
    "dance": "dancing", "dances": "dancing", "hip hop": "hip-hop", "hiphop": "hip-hop",
    "breakdance": "breakdancing", "waltzing": "waltz", "walks": "walking", "runs": "running",
    "jumps": "jumping", "spins": "spinning", "poses": "posing",
    # scenes and lighting
    "seaside": "beach", "shore": "beach", "sea": "beach", "ocean": "beach", "road": "street",
    "sidewalk": "street", "woods": "forest", "jungle": "forest", "downtown": "city",
    "square": "city", "plaza": "city", "club": "nightclub", "night club": "nightclub",
    "theater": "stage",
    "theatre": "stage", "field": "meadow", "mountains": "mountain", "hills": "mountain",
    "coffee shop": "cafe", "metro": "subway", "school": "classroom", "gallery": "museum",
    "nighttime": "night", "raining": "rain", "snowing": "snow", "sundown": "sunset",
    "candlelit": "candlelight",
    # hair
    "braid": "braids", "dreads": "dreadlocks", "locs": "dreadlocks", "bob haircut": "bob cut",
}
"""Synonym → canonical key of one of the tables above."""

PROMPT_TEMPLATES: dict[str, str] = {
    "full": "a photo of {identifier} person, {subject}, full body, wearing {clothes}, {face}, "
    "{background}, {quality}",
    "full_body": "a photo of {identifier} person, full body, standing, front view, wearing "
    "{clothes}, plain light grey studio background, soft even lighting, best quality, highly "
    "detailed",
    "face_closeup": "a photo of {identifier} person, close-up portrait of the face, {face}, "
    "plain background, soft lighting, best quality, highly detailed",
    "background": "{background}, empty scene, no people, wide shot, best quality, highly detailed",
    "clothes_verbatim": "{part}, detailed fabric texture",
    "face_verbatim": "{part}, detailed symmetric face, natural skin texture",
    "background_verbatim": "{part}, soft natural light",
}
"""Templates of the composed prompts (``full`` is also used for the openai backend)."""

FULL_QUALITY = "best quality, highly detailed, sharp focus"
"""Quality terms at the end of the frame prompt (the first to go when it is too long)."""

FULL_TOKEN_BUDGET = 72
"""Approximate CLIP tokens the frame prompt may use (CLIP reads 77 with start/end tokens; words
and punctuation are counted, so rare words split by BPE may still overflow a little)."""

NEGATIVE_EXTRA = (
    "multiple people, duplicate person, disfigured face, poorly drawn face, mutated hands, "
    "bad proportions"
)
"""Terms appended to the config's default negative prompt."""

# fmt: on


def _digest() -> str:
    tables = {
        name: value
        for name, value in sorted(globals().items())
        if name.isupper() and isinstance(value, dict | tuple | frozenset | str)
    }
    text = json.dumps(tables, sort_keys=True, default=sorted, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


TABLES_DIGEST = _digest()
"""Short sha256 of every table above; part of the cache key."""
