"""The catalogue routes every family and the schemas accept real payloads and reject malformed ones.

EXAMPLES are the reference's example bodies (ringcentral-push-api.md §3.4, tidied as documented there),
test vector 1's plaintext (§2.3), and, for the families the reference has no full example of, bodies
built from the official schema's fields (voicemail, fax, renewal reminder) or from the fields
ringcentral-event-catalogue.md §1 lists (every other family). test_pipeline*.py reuse them.
The documented filter list (tests/unit/data/ringcentral-event-filters.tsv, vendored from the catalogue
reference) must route, filter by filter, to a named family with its own schema.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ingest
from ingest.data import catalogue as catalogue_module
from ingest.data.catalogue import Catalogue, CatalogueError, default_catalogue, schemas_dir

VECTOR1 = json.loads(
    b'{"timestamp":"2014-03-12T20:47:54.712+0000","body":{"extensionId":402853446008,"telephonyStatus":"OnHold"},'
    b'"event":"/restapi/v1.0/account/~/extension/402853446008/presence",'
    b'"uuid":"db01e7de-5f3c-4ee5-ab72-f8bd3b77e308"}'
)

MESSAGE_STORE = {
    "timestamp": "2014-04-29T14:29:27.408+0000", "uuid": "b11c9430-9687-4498-b12b-3fcb470bfe04",
    "event": "/restapi/v1.0/account/~/extension/406149828004/message-store",
    "ownerId": "406149828004", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "body": {"accountId": "406149828004", "extensionId": "406149828004", "lastUpdated": "2014-04-29T14:29:20.531+0000",
             "changes": [{"type": "Pager", "updatedCount": 1, "newCount": 0},
                         {"type": "SMS", "updatedCount": 0, "newCount": 1}]},
}
# The 2023 form: numeric ids, newMessageIds, VoiceMail spelling, numeric-account event path.
MESSAGE_STORE_2023 = {
    "uuid": "5482723895830476383", "event": "/restapi/v1.0/account/233676004/extension/233676004/message-store",
    "timestamp": "2023-05-10T10:01:02.345Z", "subscriptionId": "2e7f4a6c-3b2d-4f7e-9a1b-0c8d7e6f5a4b",
    "ownerId": "233676004",
    "body": {"accountId": 233676004, "extensionId": 233676004, "lastUpdated": "2023-05-10T10:01:01.000Z",
             "changes": [{"type": "VoiceMail", "newCount": 1, "updatedCount": 0, "newMessageIds": [12756735005]},
                         {"type": "SMS", "newCount": 2, "updatedCount": 0,
                          "newMessageIds": [12756735006, 12756737005]}]},
}
INSTANT_SMS = {
    "uuid": "ed1cf00c-0420-4bf5-a0ae-e659bb9f77e0",
    "event": "/restapi/v1.0/account/~/extension/823476228762/message-store/instant?type=SMS",
    "subscriptionId": "dc853541-66ac-45d8-a289-1a239fd72888", "ownerId": "823476228762",
    "timestamp": "2013-06-14T12:00:00.000Z",
    "body": {"id": "606090030016", "to": [{"phoneNumber": "+16508974563", "location": "Moss Beach, CA"}],
             "from": {"phoneNumber": "+14157809227", "name": "John Smith"}, "type": "SMS",
             "creationTime": "2016-02-22T17:01:00.000Z", "lastModifiedTime": "2016-02-22T17:01:00.000Z",
             "readStatus": "Unread", "priority": "Normal",
             "attachments": [{"uri": "/restapi/v1.0/account/~/extension/823476228762/message-store/2640223004/content/"
                                     "2640223004", "id": "606090030016", "type": "Text",
                              "contentType": "text/plain", "size": 4096}],
             "direction": "Inbound", "availability": "Alive", "subject": "Hi there", "messageStatus": "Received",
             "conversationId": "7876416245344257449"},
}
PRESENCE = {
    "uuid": "045b81dc-9f73-4864-84de-08aa6324a7f5", "event": "/restapi/v1.0/account/~/extension/6610372004/presence",
    "timestamp": "2016-02-18T09:37:24.597Z", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "ownerId": "6610372004",
    "body": {"extensionId": "6610372004", "telephonyStatus": "CallConnected", "sequence": 2698,
             "presenceStatus": "Busy", "userStatus": "Available", "meetingStatus": "Disconnected",
             "dndStatus": "TakeAllCalls", "allowSeeMyPresence": True, "ringOnMonitoredCall": False,
             "pickUpCallsOnHold": False},
}
DETAILED_PRESENCE = copy.deepcopy(PRESENCE)
DETAILED_PRESENCE["event"] = "/restapi/v1.0/account/~/extension/6610372004/presence?detailedTelephonyState=true"
DETAILED_PRESENCE["body"].update({"totalActiveCalls": 1, "activeCalls": [{
    "id": "39247ebfdc324e3b96d7519672aec3e4", "direction": "Inbound", "queueCall": True, "from": "+18775380038",
    "fromName": "John Wang", "to": "+18445810019", "telephonyStatus": "CallConnected",
    "startTime": "2016-02-18T09:37:24.322Z", "sessionId": "17133704004", "partyId": "cs171843418296416309-2",
    "telephonySessionId": "Y3MxNjk4ODA5MTYxMzUyOTU5OUAxMC4zMi40NS44NA"}]})
TELEPHONY = {
    "uuid": "1823485288313944239", "event": "/restapi/v1.0/account/809646016/extension/809646016/telephony/sessions",
    "timestamp": "2020-06-14T19:27:18.390Z", "subscriptionId": "53300e7c-5e69-42bf-ab4d-179aabc6e869",
    "ownerId": "809646016",
    "body": {"sequence": 3, "sessionId": "425008160016", "telephonySessionId": "s-a6abd24ca6774373a8120a3390d3cbe8",
             "serverId": "10.13.22.28.TAM", "eventTime": "2020-06-14T19:27:18.340Z",
             "parties": [{"accountId": "809646016", "extensionId": "809646016",
                          "id": "p-a6abd24ca6774373a8120a3390d3cbe8-2", "direction": "Inbound",
                          "to": {"phoneNumber": "+19043014558", "name": "TESTER Babji", "extensionId": "809646016"},
                          "from": {"phoneNumber": "+14083388064"}, "status": {"code": "Setup", "rcc": False},
                          "park": {}, "missedCall": False, "standAlone": False, "muted": False}],
             "origin": {"type": "Call"}},
}
EXTENSION_LIST = {
    "timestamp": "2014-04-29T14:29:27.408+0000", "subscriptionId": "a45645-0001-cc71-9de3-674476722",
    "ownerId": "1500723004", "uuid": "b11c9430-9687-4498-b12b-3fcb470bfe04",
    "event": "/restapi/v1.0/account/~/extension",
    "body": {"extensions": [{"extensionId": "74953947939", "eventType": "Delete"},
                            {"extensionId": "8798797945", "eventType": "Create"},
                            {"extensionId": "8475874957", "eventType": "Update",
                             "hints": ["ExtensionInfo", "CompanyNumbers"]}]},
}
VOICEMAIL = {
    "uuid": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "event": "/restapi/v1.0/account/~/extension/~/voicemail",
    "timestamp": "2021-03-01T08:00:00.000Z", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "ownerId": 6610372004,
    "body": {"id": 11950867004, "type": "VoiceMail", "from": {"phoneNumber": "+14155550100", "name": "Ann"},
             "to": [{"extensionNumber": "101", "name": "Bob"}], "creationTime": "2021-03-01T07:59:58.000Z",
             "readStatus": "Unread", "priority": "Normal", "direction": "Inbound", "availability": "Alive",
             "messageStatus": "Received", "vmTranscriptionStatus": "NotAvailable",
             "attachments": [{"id": 11950867004, "uri": "/restapi/v1.0/account/1/extension/2/message-store/3/content/4",
                              "type": "AudioRecording", "contentType": "audio/mpeg", "vmDuration": 21}]},
}
FAX = {
    "uuid": "7bc9a1d2-11e4-4a56-9cde-0f1e2d3c4b5a",
    "event": "/restapi/v1.0/account/~/extension/~/fax?direction=Inbound",
    "timestamp": "2021-03-01T09:00:00.000+0000", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "body": {"id": "11950867010", "type": "Fax", "from": {"phoneNumber": "+14155550101"},
             "to": [{"phoneNumber": "+14155550102"}], "direction": "Inbound", "faxResolution": "High",
             "faxPageCount": 2,
             "attachments": [{"id": "1", "uri": "/restapi/v1.0/x", "type": "RenderedDocument",
                              "contentType": "application/pdf"}]},
}
REMINDER = {
    "uuid": "8234712349871234987", "event": "/restapi/v1.0/subscription/~?threshold=60&interval=15",
    "timestamp": "2024-01-01T00:00:00.000Z", "subscriptionId": "9d38419f-645f-4ee3-a053-8cf1368c21c4",
    "ownerId": "6610372004", "body": {"expiresIn": 59},
}

SUB = "9d38419f-645f-4ee3-a053-8cf1368c21c4"
# Families the push reference has no example of: bodies built from ringcentral-event-catalogue.md §1 (the
# specification schema's fields, or the documentation's where no schema exists), with the envelope quirks
# it records (decimal uuids, numeric or placeholder accounts in `event`, null team-messaging fields).
A2P_BATCH = {
    "uuid": "5412309871234509871", "event": "/restapi/v1.0/account/809646016/a2p-sms/batches",
    "timestamp": "2024-02-01T10:00:00.120Z", "subscriptionId": SUB, "ownerId": "809646016",
    "body": {"id": "b-3157yoo2", "from": "+16505550100", "batchSize": 2, "processedCount": 1,
             "status": "Processing", "creationTime": "2024-02-01T09:59:58.000Z",
             "lastModifiedTime": "2024-02-01T10:00:00.000Z"},
}
A2P_MESSAGE = {
    "uuid": "5412309871234509872", "event": "/restapi/v1.0/account/~/a2p-sms/messages?direction=Outbound",
    "timestamp": "2024-02-01T10:00:01.000Z", "subscriptionId": SUB, "ownerId": "809646016",
    "body": {"id": "61542118009", "from": "+16505550100", "to": "+14155550123", "text": "Your code is 4711",
             "creationTime": "2024-02-01T09:59:58.000Z", "lastModifiedTime": "2024-02-01T10:00:01.000Z",
             "messageStatus": "Delivered", "segmentCount": 1, "cost": 0.007, "batchId": "b-3157yoo2",
             "direction": "Outbound"},
}
A2P_OPT_OUT = {  # the guide's example: 20-digit uuid, numeric placeholder account
    "uuid": "12345678901234567890", "event": "/restapi/v1.0/account/11111111/a2p-sms/opt-outs",
    "timestamp": "2024-02-01T10:05:00.000Z", "subscriptionId": SUB, "ownerId": "62264425004",
    "body": {"from": "+14155550123", "to": "+16505550100", "active": True},
}
SMS_CONSENT = {  # the guide's example keeps the literal {accountId} and 9 fractional digits in the body
    "uuid": "8123456789012345678", "event": "/restapi/v2/accounts/{accountId}/sms/consents",
    "timestamp": "2024-05-01T10:00:00.123Z", "subscriptionId": SUB, "ownerId": "62264425004",
    "body": {"records": [{"from": "+14155550123", "to": "+16505550100", "optStatus": "OptOut",
                          "source": "Recipient", "lastModifiedTime": "2024-05-01T10:00:00.123456789Z"}]},
}
MESSAGE_THREADS = {
    "uuid": "8123456789012345679", "event": "/restapi/v1.0/account/~/message-threads/entries/sync",
    "timestamp": "2024-05-01T10:00:00.000Z", "subscriptionId": SUB, "ownerId": "62264425004",
    "body": {"lastModifiedTime": "2024-05-01T09:59:59.870Z"},
}
ACCOUNT_PRESENCE = copy.deepcopy(PRESENCE)
ACCOUNT_PRESENCE["event"] = "/restapi/v1.0/account/~/presence"
PRESENCE_LINE = {
    "uuid": "045b81dc-9f73-4864-84de-08aa6324a7f6",
    "event": "/restapi/v1.0/account/~/extension/6610372004/presence/line",
    "timestamp": "2016-02-18T09:37:24.597Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"extension": {"id": "171857008"}, "sequence": 12},
}
DND_STATUS = {
    "uuid": "045b81dc-9f73-4864-84de-08aa6324a7f7", "event": "/restapi/v1.0/account/~/extension/~/presence/dnd",
    "timestamp": "2022-02-18T09:37:24.597Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"extensionId": 6610372004, "dndStatus": "DoNotAcceptAnyCalls"},
}
CALL_QUEUE_PRESENCE = {  # the specification's shape; the page's is a variation below
    "uuid": "8123456789012345680", "event": "/restapi/v1.0/account/~/call-queues/62264425004/presence",
    "timestamp": "2024-05-01T10:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"extensionId": "6610372004", "callQueueId": "62264425004", "acceptCalls": False},
}
COMPANY_DIRECTORY = {
    "uuid": "8123456789012345681", "event": "/restapi/v1.0/account/809646016/directory/entries",
    "timestamp": "2021-01-01T00:00:00.000+0000", "subscriptionId": SUB, "ownerId": "809646016",
    "body": {"id": "809646017", "eventType": "Update", "type": "User", "status": "Enabled", "firstName": "Ann",
             "lastName": "Lee", "name": "Ann Lee", "department": "Sales", "email": "ann@example.invalid",
             "extensionNumber": "101", "account": {"id": "809646016"},
             "phoneNumbers": [{"phoneNumber": "+16505550100", "usageType": "DirectNumber", "type": "VoiceFax",
                               "hidden": False}],
             "site": {"id": "main-site", "name": "Main"}, "profileImage": {"uri": "https://x.invalid/p", "etag": "1"}},
}
EXTENSION_INFO = {
    "uuid": "8123456789012345682", "event": "/restapi/v1.0/account/~/extension/6610372004",
    "timestamp": "2021-01-01T00:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"extensionId": "6610372004", "eventType": "Update", "hints": ["AnsweringRules", "Permissions"],
             "ownerId": "6610372004"},
}
CONTACT_CENTER = {
    "uuid": "8123456789012345683", "event": "/restapi/v1.0/account/~/phone-number?usageType=ContactCenterNumber",
    "timestamp": "2021-01-01T00:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"eventType": "Created", "phoneNumberInfo": {
        "uri": "https://platform.ringcentral.com/restapi/v1.0/account/1/phone-number/2", "id": "1162135004",
        "phoneNumber": "+16505550199", "paymentType": "Local", "location": "Belmont, CA", "type": "VoiceFax",
        "usageType": "ContactCenterNumber", "status": "Normal",
        "contactCenterProvider": {"id": "1", "name": "RingCX"}}},
}
TEAM_POST = {  # guide examples carry null for absent fields
    "uuid": "7c4d2b65-4bb8-4e58-a0a4-8b0e0d3e1f10", "event": "/team-messaging/v1/posts",
    "timestamp": "2022-01-01T00:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"id": "5852045316", "groupId": "948543490", "type": "TextMessage", "text": "hello",
             "creatorId": "6610372004", "addedPersonIds": None, "eventType": "PostAdded",
             "creationTime": "2022-01-01T00:00:00.000Z", "lastModifiedTime": "2022-01-01T00:00:00.000Z",
             "attachments": None, "activity": None, "title": None, "iconUri": None, "iconEmoji": None,
             "mentions": None},
}
TEAM_CHAT = {
    "uuid": "7c4d2b65-4bb8-4e58-a0a4-8b0e0d3e1f11", "event": "/team-messaging/v1/chats",
    "timestamp": "2022-01-01T00:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"id": "948543490", "name": "Sales", "description": None, "type": "Team", "status": "Active",
             "members": ["6610372004", "171857008"], "isPublic": True, "eventType": "GroupJoined",
             "creationTime": "2022-01-01T00:00:00.000Z", "lastModifiedTime": "2022-01-01T00:00:00.000Z"},
}
TEAM_WEBHOOK = {
    "uuid": "7c4d2b65-4bb8-4e58-a0a4-8b0e0d3e1f12", "event": "/restapi/v1.0/glip/webhooks",
    "timestamp": "2022-01-01T00:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"eventType": "WebhookCreated", "id": "a1b2c3", "creatorId": "6610372004", "groupIds": ["948543490"],
             "creationTime": "2022-01-01T00:00:00.000Z", "lastModifiedTime": "2022-01-01T00:00:00.000Z",
             "uri": "https://hooks.ringcentral.com/webhook/a1b2c3", "status": "Active"},
}
RINGSENSE = {
    "uuid": "8123456789012345684", "event": "/ai/ringsense/v1/public/accounts/~/domains/pbx/insights",
    "timestamp": "2024-05-01T10:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"sourceRecordId": "2813998014", "sourceSessionId": "s-a0f1e2", "domain": "pbx", "title": "Call",
             "recordingDurationMs": 61000, "recordingStartTime": "2024-05-01T09:58:00.000Z",
             "creationTime": "2024-05-01T10:00:00.000Z", "lastModifiedTime": "2024-05-01T10:00:00.000Z",
             "insights": {"Summary": [{"value": "Customer asked about the invoice."}]}},
}
WEBINAR = {
    "uuid": "8123456789012345685", "event": "/webinar/runtime/v1/company/sessions/state?webinarId=998877",
    "timestamp": "2024-05-01T10:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "body": {"sessionId": "55443322", "webinarId": 998877, "status": "Active"},
}
MISSED_CALL = {  # flat mobile-push shape: no body, the call fields at the top level
    "uuid": "8123456789012345686", "event": "/restapi/v1.0/account/~/extension/~/missed-calls",
    "timestamp": "2019-01-01T00:00:00.000Z", "subscriptionId": SUB, "ownerId": "6610372004",
    "extensionId": "6610372004", "action": "Missed", "sessionId": "17133704004", "serverId": "10.13.22.28.TAM",
    "from": "+14155550100", "fromName": "Ann", "to": "+16505550100", "toName": "Bob", "sid": "123", "pn_ttl": 30,
    "pn_apns": {"aps": {"content-available": 1}},
}

EXAMPLES: dict[str, dict[str, Any]] = {
    "vector1": VECTOR1, "message-store": MESSAGE_STORE, "message-store-2023": MESSAGE_STORE_2023,
    "instant-message": INSTANT_SMS, "presence": PRESENCE, "detailed-presence": DETAILED_PRESENCE,
    "telephony-sessions": TELEPHONY, "extension-list": EXTENSION_LIST, "voicemail": VOICEMAIL, "fax": FAX,
    "subscription-reminder": REMINDER, "a2p-batch": A2P_BATCH, "a2p-message": A2P_MESSAGE,
    "a2p-opt-out": A2P_OPT_OUT, "sms-consent": SMS_CONSENT, "message-threads": MESSAGE_THREADS,
    "account-presence": ACCOUNT_PRESENCE, "presence-line": PRESENCE_LINE, "dnd-status": DND_STATUS,
    "call-queue-presence": CALL_QUEUE_PRESENCE, "company-directory": COMPANY_DIRECTORY,
    "extension-info": EXTENSION_INFO, "contact-center-numbers": CONTACT_CENTER, "team-post": TEAM_POST,
    "team-chat": TEAM_CHAT, "team-webhook": TEAM_WEBHOOK, "ringsense": RINGSENSE, "webinar": WEBINAR,
    "mobile-push": MISSED_CALL,
}
_EXAMPLE_GROUPS = {"vector1": "presence", "message-store-2023": "message-store", "a2p-batch": "a2p-sms",
                   "a2p-message": "a2p-sms", "a2p-opt-out": "a2p-sms", "sms-consent": "a2p-sms",
                   "team-post": "team-messaging", "team-chat": "team-messaging", "team-webhook": "team-messaging"}
EXAMPLE_FAMILY = {name: _EXAMPLE_GROUPS.get(name, name) for name in EXAMPLES}


@pytest.fixture(scope="module")
def cat() -> Catalogue:
    return default_catalogue()


@pytest.mark.parametrize(
    ("event", "family", "account"),
    [
        ("/restapi/v1.0/account/~/extension/~/message-store", "message-store", None),
        ("/restapi/v1.0/account/123/extension/456/message-store", "message-store", "123"),
        ("/restapi/v1.0/account/~/extension/~/message-store?type=VoiceMail&direction=Inbound", "message-store", None),
        ("/restapi/v1.0/account/~/extension/~/message-store/instant?type=SMS", "instant-message", None),
        ("/restapi/v1.0/account/130829004/extension/~/message-store/instant?type=SMS", "instant-message", "130829004"),
        ("/restapi/v1.0/account/~/extension/~/presence", "presence", None),
        ("/restapi/v1.0/account/~/extension/402853446008/presence", "presence", None),
        ("/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=true", "detailed-presence", None),
        ("/restapi/v1.0/account/2021383004/extension/2021383004/presence?detailedTelephonyState=true&sipData=true",
         "detailed-presence", "2021383004"),
        ("/restapi/v1.0/account/~/extension/~/presence?sipData=true&detailedTelephonyState=TRUE",
         "detailed-presence", None),
        ("/restapi/v1.0/account/~/extension/~/presence?detailedTelephonyState=false", "presence", None),
        ("/restapi/v1.0/account/~/telephony/sessions", "telephony-sessions", None),
        ("/restapi/v1.0/account/809646016/telephony/sessions?direction=Inbound&statusCode=Setup",
         "telephony-sessions", "809646016"),
        ("/restapi/v1.0/account/809646016/extension/809646016/telephony/sessions", "telephony-sessions", "809646016"),
        ("/restapi/v1.0/account/~/extension", "extension-list", None),
        ("/restapi/v1.0/account/77/extension", "extension-list", "77"),
        ("/restapi/v1.0/account/~/extension/~/voicemail", "voicemail", None),
        ("/restapi/v1.0/account/5/extension/6/voicemail", "voicemail", "5"),
        ("/restapi/v1.0/account/~/extension/~/fax?direction=Inbound", "fax", None),
        ("/restapi/v1.0/account/~/extension/~/fax", "fax", None),
        ("/restapi/v1.0/subscription/~?threshold=60&interval=15", "subscription-reminder", None),
        ("/restapi/v1.0/subscription/ed329ec1-0600-4560-b6dc-c764399e9a54?threshold=120&interval=60",
         "subscription-reminder", None),
        ("/restapi/v1.0/account/~/extension/~", "extension-info", None),
        ("/restapi/v1.0/account/~/extension/~/favorite", "extension-info", None),
        ("/restapi/v1.0/account/5/device/802/emergency-address", "extension-info", "5"),
        ("/restapi/v1.0/account/~/presence", "account-presence", None),
        ("/restapi/v1.0/account/~/presence?detailedTelephonyState=true", "account-presence", None),
        ("/restapi/v1.0/account/~/extension/~/missed-calls", "mobile-push", None),
        # Lines monitored by / favorites of an extension: the extension presence shapes (catalogue D1-D3).
        ("/restapi/v1.0/account/~/extension/171857008/presence/line/presence", "presence", None),
        ("/restapi/v1.0/account/~/extension/~/favorite/presence?detailedTelephonyState=true&sipData=true",
         "detailed-presence", None),
        ("/restapi/v1.0/account/~/extension/171857008/presence/line", "presence-line", None),
        ("/restapi/v1.0/account/~/extension/~/presence/dnd", "dnd-status", None),
        ("/team-messaging/v1/posts", "team-messaging", None),
        ("/team-messaging/v1/chats", "team-messaging", None),
        ("/restapi/v1.0/account/1/extension/2/glip/groups", "team-messaging", "1"),
        ("/restapi/v2/accounts/~/sms/consents", "a2p-sms", None),
        ("/ai/ringsense/v1/public/accounts/~/domains/ms-teams/insights", "ringsense", None),
        # Documentation placeholders and redacted ids: the same family every time, the channel's account key.
        ("/restapi/v1.0/account/{accountId}/extension/{extensionId}/presence/dnd", "dnd-status", None),
        ("/restapi/v1.0/account/80964XXXX/extension/40xxx08/telephony/sessions", "telephony-sessions", None),
        ("/restapi/v1.0/account/11111111/a2p-sms/opt-outs", "a2p-sms", "11111111"),
        # Unknown or malformed paths: the default family.
        ("/restapi/v1.0/account/~/extension/~/unheard-of", "other", None),
        ("/restapi/v1.0/account/abc/extension/~/presence", "other", None),
        ("/restapi/v1.0/account/~/extension/~/presence/extra", "other", None),
        ("restapi/v1.0/account/~/extension", "other", None),
        ("", "other", None),
        ("/restapi/v1.0/account/9/whatever", "other", "9"),
    ],
)
def test_routing(cat: Catalogue, event: str, family: str, account: str | None) -> None:
    route = cat.route(event)
    assert route.family.name == family
    assert route.account_id == account
    assert cat.resolve(event) is route.family


FAMILIES = {"message-store", "instant-message", "fax", "voicemail", "a2p-sms", "message-threads", "presence",
            "detailed-presence", "account-presence", "presence-line", "dnd-status", "call-queue-presence",
            "telephony-sessions", "company-directory", "extension-info", "extension-list", "contact-center-numbers",
            "team-messaging", "ringsense", "webinar", "subscription-reminder", "mobile-push"}


def test_families_with_schema_have_topics_and_distinct_schemas(cat: Catalogue) -> None:
    with_schema = {n for n, f in cat.families.items() if f.has_schema}
    assert with_schema == FAMILIES
    assert len({cat.families[n].schema_id for n in with_schema}) == len(with_schema)
    for name in with_schema:
        assert cat.families[name].topic_suffix == name
    assert set(cat.families) - with_schema == {"other"}
    assert cat.default.schema_id == cat.envelope.schema_id
    assert cat.default.topic_suffix is None
    assert cat.default.name == "other"


def test_every_family_schema_says_where_it_comes_from() -> None:
    """Schemas without a specification schema behind them are marked as written from the documentation."""
    spec = json.loads((schemas_dir() / "catalogue.json").read_text())
    for name, family in spec["families"].items():
        sources = json.loads((schemas_dir() / family["schema"]).read_text())["x-source"]
        assert sources and set(sources) <= {"specification", "specification-1.0.46", "documentation"}, name


def test_routing_by_path_shape_finds_what_a_scan_of_every_route_finds(cat: Catalogue) -> None:
    """Routing tries only the routes of the path's shape; the answer must be the first route, in catalogue order."""
    spec = json.loads((schemas_dir() / "catalogue.json").read_text())
    routes = [(catalogue_module._compile_pattern(r["pattern"], spec["placeholders"]),
               {k: str(v).lower() for k, v in r.get("query", {}).items()}, r["family"]) for r in spec["routes"]]

    def scan(event: str) -> str:
        path, _, query = event.partition("?")
        params = catalogue_module._parse_query(query)
        return next((family for pattern, wanted, family in routes
                     if pattern.fullmatch(path) and all(params.get(k) == v for k, v in wanted.items())), "other")

    events = [e for _, e in documented_events()] + [
        "/restapi/v1.0/account/~/extension/~/presence/", "/restapi/v1.0/account/~/extension/~/",
        "/restapi/v1.0/account/~/extension/",
        "/restapi/v1.0/account/1/extension/2/presence?detailedTelephonyState=TRUE",
        "/restapi/v1.0/account/~/extension/~/presence//", "/restapi/v1.0/subscription/abc-1/", "/", "", "presence",
        "/restapi/v1.0/account/~/a2p-sms/batches/x/", "/restapi/v1.0/account/~/extension/~/unheard-of"]
    for event in events:
        assert cat.route(event).family.name == scan(event), event


def test_route_cache_returns_same_answer_and_stays_bounded(cat: Catalogue) -> None:
    local = Catalogue()
    first = local.route("/restapi/v1.0/account/~/extension/~/presence")
    assert local.route("/restapi/v1.0/account/~/extension/~/presence") is first
    for i in range(catalogue_module.ROUTE_CACHE_SIZE + 10):
        local.route(f"/restapi/v1.0/account/{i}/extension/~/presence")
    assert len(local._cache) <= catalogue_module.ROUTE_CACHE_SIZE
    assert local.route("/restapi/v1.0/account/~/extension/~/presence").family.name == "presence"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_route_and_validate(cat: Catalogue, name: str) -> None:
    doc = EXAMPLES[name]
    family = cat.resolve(doc["event"])
    assert family.name == EXAMPLE_FAMILY[name]
    errors = [e.message for e in family.validator.iter_errors(doc)]
    assert errors == []
    assert cat.envelope.validator.is_valid(doc) or family.name == "mobile-push"  # the one flat shape: no body


def _walk(doc: Any, path: str) -> tuple[Any, Any]:
    """The container of the dotted `path` (list indices are numbers) and the last step."""
    steps: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = doc
    for step in steps[:-1]:
        target = target[step]
    return target, steps[-1]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target, last = _walk(doc, path)
        target[last] = value
    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target, last = _walk(doc, path)
        del target[last]
    return mutate


MUTATIONS: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    # envelope
    ("vector1", "no event", _drop("event")),
    ("vector1", "no body", _drop("body")),
    ("vector1", "body is a list", _set("body", [1, 2])),
    ("vector1", "body is a string", _set("body", "x")),
    ("vector1", "event not a string", _set("event", 42)),
    ("vector1", "event not a path", _set("event", "restapi")),
    ("vector1", "uuid not a uuid", _set("uuid", "not-a-uuid")),
    ("vector1", "uuid a number", _set("uuid", 123)),
    ("vector1", "timestamp without zone", _set("timestamp", "2014-03-12T20:47:54.712")),
    ("vector1", "timestamp garbage", _set("timestamp", "yesterday")),
    ("presence", "subscriptionId a number", _set("subscriptionId", 5)),
    ("presence", "ownerId a bool", _set("ownerId", True)),
    ("presence", "ownerId empty", _set("ownerId", "")),
    # presence
    ("vector1", "presence without extensionId", _drop("body.extensionId")),
    ("vector1", "extensionId a float", _set("body.extensionId", 1.5)),
    ("vector1", "extensionId negative", _set("body.extensionId", -1)),
    ("presence", "unknown telephonyStatus", _set("body.telephonyStatus", "Dancing")),
    ("presence", "sequence a string", _set("body.sequence", "2698")),
    ("presence", "allowSeeMyPresence a string", _set("body.allowSeeMyPresence", "true")),
    ("detailed-presence", "activeCalls an object", _set("body.activeCalls", {})),
    ("detailed-presence", "active call direction", _set("body.activeCalls.0.direction", "Sideways")),
    ("detailed-presence", "totalActiveCalls negative", _set("body.totalActiveCalls", -1)),
    # message store
    ("message-store", "no changes", _drop("body.changes")),
    ("message-store", "changes not a list", _set("body.changes", {"type": "SMS"})),
    ("message-store", "unknown message type", _set("body.changes.0.type", "Carrier pigeon")),
    ("message-store", "count a string", _set("body.changes.0.newCount", "1")),
    ("message-store-2023", "newMessageIds not a list", _set("body.changes.0.newMessageIds", 5)),
    ("message-store", "lastUpdated not a date", _set("body.lastUpdated", "2014-04-29")),
    # instant message
    ("instant-message", "no from", _drop("body.from")),
    ("instant-message", "to not a list", _set("body.to", {"phoneNumber": "+1"})),
    ("instant-message", "type Fax", _set("body.type", "Fax")),
    ("instant-message", "size a string", _set("body.attachments.0.size", "4096")),
    # telephony
    ("telephony-sessions", "no parties", _drop("body.parties")),
    ("telephony-sessions", "party without status", _drop("body.parties.0.status")),
    ("telephony-sessions", "status without code", _drop("body.parties.0.status.code")),
    ("telephony-sessions", "sequence a string", _set("body.sequence", "3")),
    # extension list
    ("extension-list", "no extensions", _drop("body.extensions")),
    ("extension-list", "unknown eventType", _set("body.extensions.0.eventType", "Explode")),
    ("extension-list", "hints not a list", _set("body.extensions.2.hints", "ExtensionInfo")),
    # voicemail, fax, reminder
    ("voicemail", "type SMS", _set("body.type", "SMS")),
    ("voicemail", "no id", _drop("body.id")),
    ("voicemail", "vmDuration a string", _set("body.attachments.0.vmDuration", "21")),
    ("fax", "faxPageCount a string", _set("body.faxPageCount", "2")),
    ("fax", "type Voicemail", _set("body.type", "Voicemail")),
    ("subscription-reminder", "no expiresIn", _drop("body.expiresIn")),
    ("subscription-reminder", "expiresIn a string", _set("body.expiresIn", "59")),
    # a2p-sms: each event path has its own body
    ("a2p-batch", "batchSize a string", _set("body.batchSize", "2")),
    ("a2p-batch", "batch without id", _drop("body.id")),
    ("a2p-message", "direction Sideways", _set("body.direction", "Sideways")),
    ("a2p-message", "cost a string", _set("body.cost", "0.007")),
    ("a2p-opt-out", "opt-out without to", _drop("body.to")),
    ("a2p-opt-out", "active a string", _set("body.active", "yes")),
    ("sms-consent", "unknown optStatus", _set("body.records.0.optStatus", "Maybe")),
    ("sms-consent", "records not a list", _set("body.records", {"from": "+1"})),
    ("sms-consent", "opt-out body on the consent path", _set("body", {"from": "+1", "to": "+2", "active": True})),
    # message threads
    ("message-threads", "no lastModifiedTime", _drop("body.lastModifiedTime")),
    ("message-threads", "lastModifiedTime not a date", _set("body.lastModifiedTime", "today")),
    # presence families
    ("account-presence", "no extensionId", _drop("body.extensionId")),
    ("account-presence", "unknown telephonyStatus", _set("body.telephonyStatus", "Dancing")),
    ("account-presence", "activeCalls an object", _set("body.activeCalls", {})),
    ("presence-line", "no extension", _drop("body.extension")),
    ("presence-line", "extension id a bool", _set("body.extension.id", True)),
    ("presence-line", "a line without id", _set("body.extension", [{"id": "1"}, {}])),
    ("dnd-status", "unknown dndStatus", _set("body.dndStatus", "Sleeping")),
    ("dnd-status", "no dndStatus", _drop("body.dndStatus")),
    ("call-queue-presence", "acceptCalls a string", _set("body.acceptCalls", "false")),
    ("call-queue-presence", "neither extensionId nor member", _drop("body.extensionId")),
    ("call-queue-presence", "a record without member", _set("body", {"records": [{"acceptCurrentQueueCalls": 1}]})),
    # account and directory
    ("company-directory", "no id", _drop("body.id")),
    ("company-directory", "unknown status", _set("body.status", "Sleeping")),
    ("company-directory", "phoneNumbers an object", _set("body.phoneNumbers", {"phoneNumber": "+1"})),
    ("company-directory", "a contact without id", _set("body", {"contacts": [{"eventType": "Update"}]})),
    ("extension-info", "no extensionId", _drop("body.extensionId")),
    ("extension-info", "hints a string", _set("body.hints", "Permissions")),
    ("extension-info", "unknown eventType", _set("body.eventType", "Explode")),
    ("contact-center-numbers", "present-tense eventType", _set("body.eventType", "Create")),
    ("contact-center-numbers", "no eventType", _drop("body.eventType")),
    ("contact-center-numbers", "phoneNumberInfo a list", _set("body.phoneNumberInfo", [])),
    # team messaging: posts, chats, webhooks
    ("team-post", "unknown post eventType", _set("body.eventType", "PostExploded")),
    ("team-post", "post without id", _drop("body.id")),
    ("team-post", "group eventType on a post", _set("body.eventType", "GroupJoined")),
    ("team-chat", "members a string", _set("body.members", "6610372004")),
    ("team-chat", "isPublic a string", _set("body.isPublic", "yes")),
    ("team-webhook", "unknown webhook status", _set("body.status", "Paused")),
    ("team-webhook", "no eventType", _drop("body.eventType")),
    # ringsense, webinar, mobile push
    ("ringsense", "no sourceRecordId", _drop("body.sourceRecordId")),
    ("ringsense", "insights a list", _set("body.insights", [])),
    ("webinar", "webinarId a bool", _set("body.webinarId", True)),
    ("webinar", "body a list", _set("body", [])),
    ("mobile-push", "pn_ttl a string", _set("pn_ttl", "30")),
    ("mobile-push", "timestamp garbage", _set("timestamp", "yesterday")),
]


@pytest.mark.parametrize(("name", "what", "mutate"), MUTATIONS, ids=[f"{n}:{w}" for n, w, _ in MUTATIONS])
def test_mutated_examples_are_rejected(cat: Catalogue, name: str, what: str,
                                       mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(EXAMPLES[name])
    mutate(doc)
    family = cat.resolve(doc["event"]) if isinstance(doc.get("event"), str) else cat.default
    assert not family.validator.is_valid(doc), what


VARIATIONS: list[tuple[str, str, Callable[[dict[str, Any]], Any]]] = [
    ("presence", "no uuid/timestamp/subscriptionId/ownerId",
     lambda d: [d.pop(k) for k in ("uuid", "timestamp", "subscriptionId", "ownerId")]),
    ("presence", "decimal uuid", _set("uuid", "1823485288313944239")),
    ("presence", "+0000 timestamp", _set("timestamp", "2016-02-18T09:37:24.597+0000")),
    ("presence", "+00:00 timestamp", _set("timestamp", "2016-02-18T09:37:24.597+00:00")),
    ("presence", "timestamp without fraction", _set("timestamp", "2016-02-18T09:37:24Z")),
    ("presence", "numeric ids", _set("body.extensionId", 6610372004)),
    ("presence", "unknown extra fields", _set("body.somethingNew", {"x": [1]})),
    ("presence", "unknown envelope field", _set("newEnvelopeField", "x")),
    ("message-store", "Voicemail spelling", _set("body.changes.0.type", "Voicemail")),
    ("voicemail", "Voicemail spelling", _set("body.type", "Voicemail")),
    ("extension-list", "flat official shape",
     _set("body", {"extensionId": "1", "eventType": "Update", "ownerId": "2"})),
    ("telephony-sessions", "numeric party ids", _set("body.parties.0.extensionId", 809646016)),
    ("a2p-batch", "numeric batch id and +0000", lambda d: d["body"].update(
        id=3157, lastModifiedTime="2024-02-01T10:00:00.000+0000")),
    ("a2p-batch", "specific batch path", _set("event", "/restapi/v1.0/account/~/a2p-sms/batches/b-3157yoo2")),
    ("a2p-message", "inbound with errorCode", lambda d: d["body"].update(direction="Inbound", errorCode="")),
    ("a2p-opt-out", "opt-in (active false)", _set("body.active", False)),
    ("sms-consent", "numeric account in a v2 path", _set("event", "/restapi/v2/accounts/809646016/sms/consents")),
    ("account-presence", "detailed account presence", lambda d: d.update(
        event="/restapi/v1.0/account/~/presence?detailedTelephonyState=true",
        body={**d["body"], "activeCalls": DETAILED_PRESENCE["body"]["activeCalls"], "totalActiveCalls": 1})),
    ("presence-line", "numeric extension id", _set("body.extension.id", 171857008)),
    ("dnd-status", "string extensionId and placeholder path", lambda d: d.update(
        event="/restapi/v1.0/account/{accountId}/extension/{extensionId}/presence/dnd",
        body={"extensionId": "6610372004", "dndStatus": "TakeDepartmentCallsOnly"})),
    ("call-queue-presence", "the documentation page's shape",
     _set("body", {"member": {"id": 6610372004}, "acceptCurrentQueueCalls": True})),
    ("extension-info", "Delete without hints", _set("body", {"extensionId": 6610372004, "eventType": "Delete"})),
    ("extension-info", "favorites list changed", lambda d: d.update(
        event="/restapi/v1.0/account/~/extension/~/favorite", body={"extensionId": "1", "ownerId": "1"})),
    ("extension-info", "grant list changed", lambda d: d.update(
        event="/restapi/v1.0/account/~/extension/~/grant", body={"extensionId": 1})),
    ("extension-info", "emergency address changed", lambda d: d.update(
        event="/restapi/v1.0/account/~/device/8021/emergency-address",
        body={"extensionId": "1", "deviceId": 8021})),
    ("company-directory", "sparse change", _set("body", {"id": 809646017, "eventType": "Delete"})),
    ("team-post", "PostRemoved: id and groupId only", _set("body", {"id": "1", "groupId": "2",
                                                                    "eventType": "PostRemoved"})),
    ("team-post", "legacy glip path", _set("event", "/restapi/v1.0/glip/posts")),
    ("team-chat", "GroupLeft: id only", _set("body", {"id": "948543490", "eventType": "GroupLeft"})),
    ("team-chat", "members as objects, groups path", lambda d: d.update(
        event="/team-messaging/v1/groups", body={**d["body"], "members": [{"id": "1"}, {"id": 2}]})),
    ("team-chat", "extension glip/groups path, GroupAdded", lambda d: d.update(
        event="/restapi/v1.0/account/809646016/extension/809646016/glip/groups",
        body={"id": "1", "eventType": "GroupAdded"})),
    ("team-webhook", "WebhookUpdated: before and after", _set("body", {
        "eventType": "WebhookUpdated", "before": {"status": "Active"},
        "after": {"id": "a1", "status": "Suspended"}})),
    ("ringsense", "another domain, numeric ids", lambda d: d.update(
        event="/ai/ringsense/v1/public/accounts/~/domains/rcx/insights",
        body={**d["body"], "sourceRecordId": 2813998014, "domain": "rcx"})),
    ("webinar", "registrants, unknown fields", lambda d: d.update(
        event="/webinar/registration/v1/company/sessions/registrants", body={"id": "r1", "email": "a@b.invalid"})),
    ("mobile-push", "start-ring with GCM's _from", lambda d: d.update(
        event="/restapi/v1.0/account/~/extension/~/start-ring", action="StartRing", _from="+14155550100")),
    ("mobile-push", "inbound message badge, no timestamp", lambda d: [d.pop(k) for k in (
        "timestamp", "sessionId", "action")] and d.update(
        event="/restapi/v1.0/account/~/extension/~/inbound-messages?badge=true", messageId=1, conversationId="2",
        aps={"alert": {"title": "SMS", "body": "hi"}, "badge": "1"})),
    ("instant-message", "the 2025 guide's fields, numeric attachment id", lambda d: d["body"].update(
        eventType="Create", owner={"extensionId": "1", "extensionType": "User"}, conversation={"id": "2"},
        attachments=[{**d["body"]["attachments"][0], "id": 606090030016}])),
    ("detailed-presence", "with SIP data, on a monitored line", lambda d: d.update(
        event="/restapi/v1.0/account/~/extension/~/presence/line/presence?detailedTelephonyState=true&sipData=true",
        body={**d["body"], "activeCalls": [{**d["body"]["activeCalls"][0], "sipData": {
            "toTag": "a", "fromTag": "b", "remoteUri": "sip:+1@x", "localUri": "sip:+2@y"}}]})),
    ("fax", "numeric id, outbound, located parties", lambda d: d["body"].update(
        id=11950867010, direction="Outbound", to=[{"phoneNumber": "+14155550102", "location": "SF, CA"}])),
    ("subscription-reminder", "numeric-looking subscription id", _set(
        "event", "/restapi/v1.0/subscription/ed329ec1-0600-4560-b6dc-c764399e9a54?threshold=120&interval=60")),
    ("message-threads", "thread sync, +0000", lambda d: d.update(
        event="/restapi/v1.0/account/809646016/message-threads/sync",
        body={"lastModifiedTime": "2024-05-01T09:59:59.870+0000"})),
    ("contact-center-numbers", "Deleted, sparse, numeric id", _set(
        "body", {"eventType": "Deleted", "phoneNumberInfo": {"id": 1162135004}})),
    # The shapes of the documentation's own examples, where they differ from its tables and the specification.
    ("company-directory", "a contacts array (the guide's example)", lambda d: d.update(
        body={"contacts": [COMPANY_DIRECTORY["body"], {"id": "8798797945", "eventType": "Delete"}]})),
    ("presence-line", "monitored lines as an array (the guide's example)",
     _set("body.extension", [{"id": "677628004765"}, {"id": 3}])),
    ("call-queue-presence", "records of members (the guide's example)", lambda d: d.update(
        event="/restapi/v1.0/account/{accountId}/call-queues/{groupId}/presence",
        body={"records": [{"member": {"id": "411753183004"}, "acceptCurrentQueueCalls": True},
                          {"member": {"id": 411753646416541}, "acceptCurrentQueueCalls": False}]})),
]


@pytest.mark.parametrize(("name", "what", "mutate"), VARIATIONS, ids=[f"{n}:{w}" for n, w, _ in VARIATIONS])
def test_real_world_variations_are_accepted(cat: Catalogue, name: str, what: str,
                                            mutate: Callable[[dict[str, Any]], Any]) -> None:
    doc = copy.deepcopy(EXAMPLES[name])
    mutate(doc)
    family = cat.resolve(doc["event"])
    assert [e.message for e in family.validator.iter_errors(doc)] == [], what


def test_every_family_has_an_example_a_variation_and_a_violation(cat: Catalogue) -> None:
    def families(names: list[str]) -> set[str]:
        return {cat.resolve(EXAMPLES[name]["event"]).name for name in names}
    assert families(list(EXAMPLES)) == FAMILIES
    assert families([name for name, _, _ in VARIATIONS]) == FAMILIES
    assert families([name for name, _, _ in MUTATIONS]) == FAMILIES


def test_unknown_family_is_validated_against_the_envelope(cat: Catalogue) -> None:
    family = cat.resolve("/restapi/v1.0/account/~/extension/~/unheard-of")
    assert family is cat.default
    assert family.validator.is_valid({"event": "/restapi/v1.0/account/~/extension/~/unheard-of", "body": {"a": 1}})
    assert not family.validator.is_valid({"event": "/restapi/v1.0/account/~/extension/~/unheard-of", "body": 1})


# -- the reference's filter list -----------------------------------------------------------------------

VENDORED_FILTERS = Path(__file__).parent / "data" / "ringcentral-event-filters.tsv"
REFERENCE_CATALOGUE = (Path(__file__).resolve().parents[3] / "shared" / "reference"
                       / "ringcentral-event-catalogue.md")
# Catalogue row (section letter + number) -> the family its events go to; docs/records.md explains the groups.
ROW_FAMILY = {
    "A1": "message-store", "A2": "instant-message", "A3": "fax", "A4": "voicemail",
    "B1": "a2p-sms", "B2": "a2p-sms", "B3": "a2p-sms", "B4": "a2p-sms", "C1": "a2p-sms",
    "C2": "message-threads", "C3": "message-threads",
    "D1": "presence", "D2": "detailed-presence", "D3": "detailed-presence", "D4": "account-presence",
    "D5": "presence-line", "D6": "dnd-status", "D7": "call-queue-presence",
    "E1": "telephony-sessions", "E2": "telephony-sessions",
    "F1": "company-directory", "F2": "extension-info", "F3": "extension-info", "F4": "extension-info",
    "F5": "extension-info", "F6": "extension-list", "F7": "contact-center-numbers",
    "G1": "team-messaging", "G2": "team-messaging", "G3": "team-messaging",
    "H1": "ringsense", "I1": "webinar", "I2": "webinar", "I3": "webinar", "I4": "webinar",
    "J1": "subscription-reminder", "K1": "mobile-push", "K2": "mobile-push", "K3": "mobile-push", "K4": "mobile-push",
}
# The reference writes some filters once and describes the rest in words; these are spelt out here.
SAME_THREE_PATHS = ("/presence", "/presence/line/presence", "/favorite/presence")  # D2, D3: "the same three paths"
RINGSENSE_DOMAINS = ("pbx", "rcv", "rcx", "ms-teams", "nice-incontact")  # H1: "{domain} is one of"


def reference_filters(markdown: str) -> list[tuple[str, str]]:
    """(row, filter) for every backticked filter in the "Filter(s)" column of the reference's section 1."""
    section = markdown.split("## 1. Catalogue", 1)[1].split("\n## 2.", 1)[0]
    rows = []
    for line in section.splitlines():
        match = re.match(r"^\| ([A-K][0-9]) \| [^|]* \| ([^|]*) \|", line)
        if match:
            rows += [(match.group(1), text) for text in re.findall(r"`([/…][^`]*)`", match.group(2))]
    return rows


def vendored_filters() -> list[tuple[str, str]]:
    lines = VENDORED_FILTERS.read_text(encoding="utf-8").splitlines()
    return [(row, text) for row, _, text in (line.partition("\t") for line in lines if not line.startswith("#"))]


def test_vendored_filter_list_equals_the_reference() -> None:
    if not REFERENCE_CATALOGUE.is_file():
        pytest.skip(f"{REFERENCE_CATALOGUE} absent: the vendored {VENDORED_FILTERS.name} is tested on its own")
    assert vendored_filters() == reference_filters(REFERENCE_CATALOGUE.read_text(encoding="utf-8"))


def documented_events() -> list[tuple[str, str]]:
    """(row, event path) for every documented filter, elisions and "the same three paths" spelt out."""
    elided = {"…/extension/": "/restapi/v1.0/account/{accountId}/extension/", "…/account/": "/restapi/v1.0/account/"}
    events = []
    for row, written in vendored_filters():
        text = next((full + written[len(short):] for short, full in elided.items() if written.startswith(short)),
                    written)
        if row in ("D2", "D3"):
            path, _, query = text.partition("?")
            extension = path.removesuffix("/presence")
            events += [(row, f"{extension}{tail}?{query}") for tail in SAME_THREE_PATHS]
        elif "{domain}" in text:
            events += [(row, text.replace("{domain}", domain)) for domain in RINGSENSE_DOMAINS]
        else:
            events.append((row, text))
    return events


def test_documented_filter_list_is_complete() -> None:
    events = documented_events()
    assert {row for row, _ in events} == set(ROW_FAMILY)  # every row but G4, which has no filter
    assert len(set(events)) == len(events) >= 51  # the reference counts 51 distinct filter strings


@pytest.mark.parametrize(("row", "event"), documented_events(), ids=[f"{r}:{e}" for r, e in documented_events()])
def test_every_documented_filter_routes_to_its_family(cat: Catalogue, row: str, event: str) -> None:
    """As written (literal placeholders), with `~` and with numeric ids: the same named family, never `other`."""
    forms = {event, event.replace("{accountId}", "~").replace("{extensionId}", "~"),
             re.sub(r"\{[A-Za-z]+\}", "4711", event).replace("/~/", "/123/")}
    for form in forms:
        family = cat.resolve(form)
        assert family.name == ROW_FAMILY[row], form
        assert family.has_schema and family.schema_id != cat.envelope.schema_id, form


def test_schemas_dir_finds_the_repo_checkout() -> None:
    assert schemas_dir() == Path(ingest.__file__).resolve().parent.parent / "schemas"


def test_schemas_dir_prefers_the_installed_wheel_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "ingest"
    shutil.copytree(schemas_dir(), package / "_schemas")
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(ingest, "__file__", str(package / "__init__.py"))
    assert schemas_dir() == package / "_schemas"
    installed = Catalogue(schemas_dir())
    assert installed.resolve(PRESENCE["event"]).validator.is_valid(PRESENCE)


def test_every_schema_is_draft_2020_12_with_an_id() -> None:
    for path in schemas_dir().glob("*.json"):
        if path.name == "catalogue.json":
            continue
        doc = json.loads(path.read_text())
        assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema", path.name
        assert doc["$id"].endswith("/" + path.name)


def test_a_family_without_schema_is_checked_against_the_envelope_and_goes_to_the_default_topic(
        tmp_path: Path) -> None:
    """The catalogue format still allows `schema: null` (no packaged family uses it any more)."""
    shutil.copytree(schemas_dir(), tmp_path / "s")
    spec = json.loads((tmp_path / "s" / "catalogue.json").read_text())
    spec["families"]["experimental"] = {"schema": None, "topic": None}
    spec["routes"].append({"pattern": "/restapi/v1.0/account/{account}/brand-new", "family": "experimental"})
    (tmp_path / "s" / "catalogue.json").write_text(json.dumps(spec))
    local = Catalogue(tmp_path / "s")
    family = local.resolve("/restapi/v1.0/account/~/brand-new")
    assert (family.name, family.schema_id, family.topic_suffix) == ("experimental", local.envelope.schema_id, None)
    assert family.validator.is_valid({"event": "/restapi/v1.0/account/~/brand-new", "body": {"x": 1}})


def test_broken_catalogue_is_reported(tmp_path: Path) -> None:
    shutil.copytree(schemas_dir(), tmp_path / "s")
    spec = json.loads((tmp_path / "s" / "catalogue.json").read_text())
    spec["routes"].append({"pattern": "/x", "family": "nope"})
    (tmp_path / "s" / "catalogue.json").write_text(json.dumps(spec))
    with pytest.raises(CatalogueError, match="unknown family 'nope'"):
        Catalogue(tmp_path / "s")
    spec["routes"].pop()
    spec["families"]["ghost"] = {"schema": "ghost.json", "topic": "ghost"}
    (tmp_path / "s" / "catalogue.json").write_text(json.dumps(spec))
    with pytest.raises(CatalogueError, match=r"ghost\.json"):
        Catalogue(tmp_path / "s")
