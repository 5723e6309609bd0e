"""
The bus interface (ZStack's CloudBus): request/reply messages between services, routed by
resource to the owning management node, and events published to every node.

Two implementations pass one contract suite (C{tests/bus_contract.py}): L{zcontrol.bus.local}
(in-process, the embedded default) and L{zcontrol.bus.amqp} (txAMQP on RabbitMQ).
"""

from zope.interface import Attribute, Interface

__all__ = ["IBus", "ISubscription"]


class ISubscription(Interface):
    """
    A live event subscription.
    """

    pattern = Attribute("The topic pattern (C{*} = one word, C{#} = any number of words).")

    def cancel():
        """
        Stop delivering events to this subscription. Idempotent.

        @rtype: L{Deferred} firing with None once no further event will be delivered.
        """


class IBus(Interface):
    """
    A message bus seen from one management node.

    Every C{send} Deferred fires with a L{zcontrol.bus.message.Reply} and never errbacks: a
    failure is an error reply (C{success=False}, C{error} an ErrorCode):
     - C{SYS.1001}: no reply before the timeout (details name the message);
     - C{SYS.1009}: no such service (at once, never a timeout);
     - C{SYS.1008}: the receiver does not know the message type;
     - C{SYS.1007}: a field is missing or ill-typed; the message is over the bus's size
       limit (details name the size and the limit); its id is still waiting for the reply
       of another send;
     - C{SYS.1000}: the handler raised an unexpected exception (details say which);
     - C{SYS.1011}: the message could not be delivered (broker refused it);
     - C{SYS.1012}: the management node that owns the destination left;
     - C{SYS.1016}: the connection to the broker was lost, or the reply queue was deleted,
       while the send waited (at once, never a timeout);
     - C{SYS.1017}: the send was cancelled, or this bus stopped while it waited.
    """

    node_id = Attribute("This management node's identity (a string).")
    registry = Attribute("The L{zcontrol.bus.message.Registry} used to encode and decode.")

    def start():
        """
        Connect and start consuming.

        @rtype: L{Deferred} firing with None when the bus can send and receive.
        """

    def stop():
        """
        Stop taking deliveries, wait for the handlers in flight, then answer this node's own
        waiting sends with C{SYS.1017}; peers waiting on this node get C{SYS.1012}.

        @rtype: L{Deferred} firing with None when stopped.
        """

    def register_service(service_id, handler):
        """
        Serve C{service_id} on this node. C{handler(message)} returns a Reply, a Deferred or
        coroutine firing with one, or None to reply later with L{reply}. Raising (or
        failing) with an L{OperationError} answers with its ErrorCode; any other exception
        answers C{SYS.1000}. A handler bug never stops the bus.

        @return: None, or (a bus on a remote broker) a Deferred firing with None once peers
            can reach the service.
        """

    def unregister_service(service_id):
        """
        Stop serving C{service_id} on this node.
        """

    def owner_of(resource_uuid):
        """
        The node id that owns C{resource_uuid} on the consistent-hash ring of live nodes.
        """

    def send(message, timeout=None):
        """
        Send a L{NeedReplyMessage}. C{timeout} (seconds) overrides the message's own and the
        bus default; a send made while handling another message gets at most the time its
        parent has left (deadline propagation).

        Every send is its own exchange: the first send of a message uses its C{id}; a
        message object sent before goes out as a copy under a fresh id (so the reply's
        C{correlation_id} is the copy's), and never receives the reply of an earlier
        attempt. A different message whose C{id} is still waiting is answered C{SYS.1007}
        at once.

        @rtype: L{Deferred} firing exactly once with the Reply. Cancelling it answers
            C{SYS.1017}.
        """

    def send_all(messages, timeout=None):
        """
        Send all C{messages} at once.

        @rtype: L{Deferred} firing with the list of Replies, in request order.
        """

    def send_stepping(messages, parallelism, on_reply):
        """
        Send an iterable of messages with at most C{parallelism} in flight; the next goes out
        when a reply comes back. C{on_reply(message, reply)} runs once per message; an
        exception it raises is logged. A send that fails (a message that is not a
        L{NeedReplyMessage}) is answered with an error reply carrying its ErrorCode.

        @rtype: L{Deferred} firing with None once every message has been answered; it fails
            (after the sends in flight are answered) if iterating C{messages} raises.
        """

    def post(message):
        """
        Send a fire-and-forget L{Message}; the receiver's return value is dropped.

        @rtype: L{Deferred} firing with None once the bus has taken the message (an error
            reply is not possible; a refused message errbacks with an OperationError:
            C{SYS.1011} refused by the broker, C{SYS.1016} not connected or the connection
            lost before the broker confirmed, C{SYS.1007} not encodable or too large). It
            always fires: a lost connection fails it at once.
        """

    def reply(request, reply):
        """
        Answer C{request} with C{reply} (sets its C{correlation_id}). Only the first answer
        counts; later ones are logged and dropped.
        """

    def publish(event):
        """
        Publish an L{Event} to every matching subscription on every node.

        The event of a state change already committed is better published with
        L{zcontrol.bus.publishing.publish_after_commit} (bounded retries, never fails).

        @rtype: L{Deferred} firing with None once the bus has taken the event, or failing
            as L{post} does; it always fires.
        """

    def subscribe(pattern, handler):
        """
        Call C{handler(event)} for every event whose C{topic} matches C{pattern}.

        @rtype: L{ISubscription} (subscriptions on a remote broker may take effect a moment
            later: wait on C{subscription.ready}, a Deferred, where that matters).
        """
