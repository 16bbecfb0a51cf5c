"""A fixed set of 64 chat questions, so every benchmark run and every server sees the same text.

Lengths are mixed on purpose (16 short, 32 medium, 16 long) because prefill cost and batching
behaviour depend on prompt length; no downloads, no randomness outside `pick_prompts(seed)`.
"""

from __future__ import annotations

import random

SHORT: tuple[str, ...] = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 17 times 23?",
    "Who wrote Hamlet?",
    "Define photosynthesis.",
    "What does HTTP stand for?",
    "Is a tomato a fruit?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Translate 'good morning' into Spanish.",
    "What is a prime number?",
    "Why is the sky blue?",
    "What is the largest ocean?",
    "Give me a synonym for happy.",
    "What year did World War II end?",
    "What is the square root of 144?",
)

MEDIUM: tuple[str, ...] = (
    "Explain in simple terms how a refrigerator keeps food cold.",
    "What are the main differences between a list and a tuple in Python?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "Give me three tips for improving my sleep when I work late shifts.",
    "How does compound interest work, and why does starting early matter?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Describe the water cycle for a ten-year-old student.",
    "What is the difference between weather and climate?",
    "Suggest a simple vegetarian dinner I can cook in twenty minutes.",
    "Why do cats purr, and does it always mean they are happy?",
    "Explain what a hash table is and when I would use one.",
    "What are the benefits and drawbacks of working from home?",
    "How do vaccines train the immune system to fight infections?",
    "Write a short, friendly email declining a meeting invitation.",
    "What causes the seasons on Earth?",
    "Give me a one-week plan to start running as a complete beginner.",
    "How is a bill passed into law in a parliamentary democracy?",
    "Explain recursion with an example that does not involve factorials.",
    "What are good questions to ask at the end of a job interview?",
    "Why does bread go stale, and how can I keep it fresh longer?",
    "Compare electric cars and petrol cars in terms of running costs.",
    "What is the Pythagorean theorem and where is it used in practice?",
    "Describe three common logical fallacies with a short example of each.",
    "How do noise-cancelling headphones work?",
    "What is the role of mitochondria in a cell?",
    "Write a limerick about a programmer who forgot to save their work.",
    "How can I politely ask a neighbour to turn their music down?",
    "What is inflation and how do central banks try to control it?",
    "Explain the difference between RAM and storage in a computer.",
    "What are the rules of chess for how a knight moves?",
    "Give me five creative names for a small coffee shop by the sea.",
)

LONG: tuple[str, ...] = (
    "I am planning a small vegetable garden on a sunny balcony of about four square meters. "
    "Which vegetables grow well in containers, how deep should the pots be, and how often "
    "should I water them during a hot summer?",
    "My team keeps missing deadlines because tasks are unclear and priorities change every "
    "week. As a new team lead, what practical steps can I take in the first month to make "
    "planning more predictable without adding a lot of meetings?",
    "I have a Python script that reads a large CSV file line by line, parses dates, and "
    "aggregates totals per month. It takes several minutes on a two-gigabyte file. What are "
    "the most likely bottlenecks and how would you speed it up?",
    "Explain to a curious high-school student how a neural network learns from examples, "
    "covering what weights are, what a loss function measures, and why gradient descent "
    "moves the weights in small steps rather than jumping straight to the answer.",
    "We are a family of four visiting Rome for three days in spring. We like history and "
    "good food but the kids get tired of museums quickly. Could you suggest a relaxed "
    "itinerary that balances famous sights, parks and places to eat?",
    "I want to learn to play the guitar as an adult with about twenty minutes a day. What "
    "should I focus on in the first three months, which mistakes do beginners usually make, "
    "and how do I stay motivated when progress feels slow?",
    "Write a short story of about one hundred words about a lighthouse keeper who finds a "
    "message in a bottle, with a twist at the end that changes how we see the keeper.",
    "Compare renting and buying a home for someone in their early thirties who might move "
    "cities for work in the next five years. Consider costs, flexibility, risk and the "
    "effort of maintenance, and finish with a short recommendation.",
    "A friend says that we only use ten percent of our brains. Explain where this idea "
    "comes from, what neuroscience actually shows about brain activity, and how I could "
    "explain it to my friend without sounding condescending.",
    "I run a small online shop selling handmade candles. Sales dropped by a third after the "
    "holidays. Suggest a few low-cost ways to find out why and some experiments I could run "
    "over the next two months to win customers back.",
    "Describe how the internet delivers a web page from a server on another continent to my "
    "browser, mentioning DNS, TCP, routing and caching, but keep it understandable for "
    "someone without a technical background.",
    "My elderly father wants to start exercising again after a long break but has mild knee "
    "pain. What kinds of gentle exercise are usually recommended, and what questions should "
    "we ask his doctor before he starts?",
    "Draft a polite but firm message to a landlord about a heating system that has been "
    "broken for two weeks during winter, asking for a repair date and mentioning that we "
    "have reported it twice already.",
    "Explain the trade-offs between a monolithic application and microservices for a startup "
    "with five engineers, including deployment, debugging, team coordination and cost, and "
    "say which you would choose for the first year.",
    "I keep procrastinating on a big report that is due in three weeks. Break the work into "
    "a realistic schedule, suggest how to handle days when I have no energy, and tell me "
    "how to avoid spending the last two nights writing everything.",
    "What were the main causes of the fall of the Western Roman Empire? Give a balanced "
    "overview of economic, military and political factors, and mention how historians' "
    "views on this question have changed over time.",
)

PROMPTS: tuple[str, ...] = SHORT + MEDIUM + LONG


def pick_prompts(n: int, seed: int = 0) -> list[str]:
    """N prompts in a seeded order; each prompt appears once before any repeats."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    picked: list[str] = []
    while len(picked) < n:
        picked.extend(rng.sample(PROMPTS, len(PROMPTS)))
    return picked[:n]
