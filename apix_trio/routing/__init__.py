"""Local fan-out (the EventRouter and SubscriptionManager).

- `router`: (org, channel) -> this node's subscribers; each event's frame
  encoded once.
- `subscriptions`: one connection's channel subscription and the replay seam
  (`since`: register first, replay, reply, go live).
- `namespaces`: channel -> options (history, presence, client publish).

Routing sits below the gateway: it delivers through `SubscriptionOwner`, an
interface the gateway's connection satisfies.
"""
