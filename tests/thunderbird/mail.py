"""Mail operations of a Thunderbird account, each one chrome-context script (Thunderbird 153).

`TBAccount.from_autoconfig` creates the account the way Thunderbird's account setup does: its own
`FetchConfig.fromISP` fetches our config-v1.1.xml (through an HTTP proxy pref that points at the
test server's autoconfig port, since autoconfig.<domain> cannot be port 80 in a test), then its
own `CreateInBackend.createAccountInBackend` turns the chosen entries into prefs. Everything else
(IMAP sync, streaming a body, sending, filing, POP3) uses the same XPCOM services the UI uses.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from tests.thunderbird.driver import Thunderbird

SOCKET_STARTTLS = 2  # Ci.nsMsgSocketType.alwaysSTARTTLS
SOCKET_SSL = 3  # Ci.nsMsgSocketType.SSL


def proxy_prefs(autoconfig_port: int) -> dict[str, Any]:
    """Send Thunderbird's http:// autoconfig requests to our listener (absolute-form request)."""
    return {
        "network.proxy.type": 1,
        "network.proxy.http": "127.0.0.1",
        "network.proxy.http_port": autoconfig_port,
        "network.proxy.share_proxy_settings": False,
        "network.proxy.no_proxies_on": "",
        "mailnews.auto_config.fetchFromISP.enabled": True,
        "mailnews.auto_config.fetchFromISP.sslOnly": False,
    }


# Shared helpers, prepended to every script (each script runs in a fresh sandbox).
_PRELUDE = r"""
const urlListener = (resolve, reject, what) => ({
  QueryInterface: ChromeUtils.generateQI(['nsIUrlListener']),
  OnStartRunningUrl() {},
  OnStopRunningUrl(url, status) {
    if (Components.isSuccessCode(status)) resolve();
    else reject(new Error(what + ' failed: 0x' + (status >>> 0).toString(16)));
  },
});
const theAccount = () => {
  const a = MailServices.accounts.getAccount(args[0]);
  if (!a) throw new Error('no account ' + args[0]);
  return a;
};
const withTimeout = (promise, ms, what) => Promise.race([promise, new Promise((_, reject) =>
  setTimeout(() => reject(new Error(what + ' timed out after ' + ms + ' ms')), ms))]);
const { setTimeout } = ChromeUtils.importESModule('resource://gre/modules/Timer.sys.mjs');
const discover = async (server) => {
  await withTimeout(new Promise((resolve, reject) => MailServices.imap.discoverAllFolders(
    server.rootFolder, urlListener(resolve, reject, 'folder discovery'), null)), 15000,
    'folder discovery');
};
// Update a folder from the server. When Thunderbird is already syncing it (IDLE reported new
// mail), our request is merged into that sync and our listener is never called: so when the
// caller knows which message it waits for, the header showing up counts as done too.
// The merge can also swallow the request for good: new mail announced (EXISTS) at the end of a
// message body fetch on the same connection makes Thunderbird take our update as done without
// fetching the new header, until its next update. A second update is what a user's next check
// does; the header must then show up.
const update = async (folder, expectId) => {
  for (let attempt = 1; ; attempt++) {
    const listened = new Promise((resolve, reject) =>
      folder.QueryInterface(Ci.nsIMsgImapMailFolder).updateFolderWithListener(
        null, urlListener(resolve, reject, 'update of ' + folder.name)));
    let waiting = true;
    const appeared = (async () => {
      while (waiting && !(expectId && findHeader(folder, expectId))) {
        await new Promise(r => setTimeout(r, 100));
      }
    })();
    try {
      await withTimeout(expectId ? Promise.race([listened, appeared]) : listened, 15000,
                        'update of ' + folder.name);
      return;
    } catch (e) {
      if (!expectId || attempt == 2) throw e;
    } finally {
      waiting = false;
    }
  }
};
const folderNamed = (server, path) => {
  let folder = server.rootFolder;
  for (const part of path.split('/')) {
    folder = folder.subFolders.find(f => f.name.toLowerCase() == part.toLowerCase());
    if (!folder) return null;
  }
  return folder;
};
const inboxOf = (server) => server.rootFolder.getFolderWithFlags(Ci.nsMsgFolderFlags.Inbox);
const headers = (folder) => [...folder.msgDatabase.enumerateMessages()];
const findHeader = (folder, messageId) => headers(folder).find(h => h.messageId == messageId);
const describe = (h) => ({ key: h.messageKey, messageId: h.messageId, subject: h.mime2DecodedSubject,
  size: h.messageSize, read: h.isRead, flagged: h.isFlagged });
const streamBody = (uri) => new Promise((resolve, reject) => {
  const chunks = [];
  const listener = {
    QueryInterface: ChromeUtils.generateQI(['nsIStreamListener', 'nsIRequestObserver']),
    onStartRequest() {},
    onDataAvailable(request, stream, offset, count) {
      const input = Cc['@mozilla.org/binaryinputstream;1'].createInstance(Ci.nsIBinaryInputStream);
      input.setInputStream(stream);
      chunks.push(input.readBytes(count));
    },
    onStopRequest(request, status) {
      if (Components.isSuccessCode(status)) resolve(chunks.join(''));
      else reject(new Error('streaming failed: 0x' + (status >>> 0).toString(16)));
    },
  };
  MailServices.messageServiceFromURI(uri).streamMessage(uri, listener, null, null, false, '', false);
});
"""


@dataclass
class AccountSettings:
    """What Thunderbird's prefs say after the account was created (for the assertions)."""

    key: str
    type: str
    hostname: str
    port: int
    socket_type: int
    auth_method: int
    username: str
    smtp_hostname: str
    smtp_port: int
    smtp_socket_type: int
    smtp_auth_method: int
    smtp_username: str
    fcc_folder: str
    use_condstore: bool = False  # IMAP: Thunderbird's CONDSTORE support switched on


class TBAccount:
    def __init__(self, tb: Thunderbird, settings: AccountSettings):
        self.tb = tb
        self.settings = settings
        self.key = settings.key

    def run(self, body: str, *args: Any, timeout: float = 30.0) -> Any:
        return self.tb.run(_PRELUDE + body, self.key, *args, timeout=timeout)

    @classmethod
    def from_autoconfig(cls, tb: Thunderbird, address: str, password: str, realname: str,
                        incoming_type: str, incoming_socket: int, outgoing_socket: int
                        ) -> "TBAccount":
        """Thunderbird's own autoconfig lookup and account creation (see the module docstring).

        Picks the incoming entry of `incoming_type`/`incoming_socket` and the outgoing entry with
        `outgoing_socket` among what the document offered, as a user would in the setup dialog.
        """
        result = tb.run(_PRELUDE + r"""
const [address, password, realname, inType, inSocket, outSocket] = args;
const { FetchConfig } = ChromeUtils.importESModule(
  'resource:///modules/accountcreation/FetchConfig.sys.mjs');
const { AccountConfig } = ChromeUtils.importESModule(
  'resource:///modules/accountcreation/AccountConfig.sys.mjs');
const { CreateInBackend } = ChromeUtils.importESModule(
  'resource:///modules/accountcreation/CreateInBackend.sys.mjs');
Services.io.offline = false;
const domain = address.split('@')[1];
const config = await withTimeout(FetchConfig.fromISP(domain, address, new AbortController().signal),
                                 15000, 'autoconfig lookup');
const incoming = [config.incoming, ...config.incomingAlternatives];
const chosenIn = incoming.find(s => s.type == inType && s.socketType == inSocket);
if (!chosenIn) throw new Error('autoconfig offered no ' + inType + '/' + inSocket + ': ' +
                               JSON.stringify(incoming));
config.incomingAlternatives = incoming.filter(s => s !== chosenIn);
config.incoming = chosenIn;
const outgoing = [config.outgoing, ...config.outgoingAlternatives];
const chosenOut = outgoing.find(s => s.socketType == outSocket);
if (!chosenOut) throw new Error('autoconfig offered no smtp/' + outSocket + ': ' +
                                JSON.stringify(outgoing));
config.outgoingAlternatives = outgoing.filter(s => s !== chosenOut);
config.outgoing = chosenOut;
AccountConfig.replaceVariables(config, realname, address, password);
config.incoming.loginAtStartup = false;
// What the setup dialog's "Done" does first: log in to the incoming server with these settings.
const { ConfigVerifier } = ChromeUtils.importESModule(
  'resource:///modules/accountcreation/ConfigVerifier.sys.mjs');
const verified = await withTimeout(
  new ConfigVerifier(null, new AbortController().signal).verifyConfig(config, false), 15000,
  'login check of the setup dialog');
const account = await CreateInBackend.createAccountInBackend(verified);
const server = account.incomingServer;
// The test drives every connection itself: no timed checks, no background downloads.
server.doBiff = false;
server.setBoolValue('check_new_mail', false);
server.setBoolValue('login_at_startup', false);
if (server.type == 'imap') {
  server.setBoolValue('offline_download', false);  // bodies are fetched when streamed (chunks)
  server.setBoolValue('autosync_offline_stores', false);
}
const identity = account.defaultIdentity;
identity.archivesFolderURI = server.serverURI + '/Archive';
identity.archivesFolderPickerMode = 0;
identity.archiveGranularity = 1;  // Thunderbird's default: one folder per year
const smtp = MailServices.outgoingServer.getServerByIdentity(identity)
  .QueryInterface(Ci.nsISmtpServer);
return { key: account.key, type: server.type, hostname: server.hostName ?? server.hostname, port: server.port,
         socket_type: server.socketType, auth_method: server.authMethod,
         username: server.username, smtp_hostname: smtp.hostname, smtp_port: smtp.port,
         smtp_socket_type: smtp.socketType, smtp_auth_method: smtp.authMethod,
         smtp_username: smtp.username, fcc_folder: identity.fccFolderURI,
         use_condstore: server.type == 'imap' &&
           server.QueryInterface(Ci.nsIImapIncomingServer).useCondStore };
""", address, password, realname, incoming_type, incoming_socket, outgoing_socket)
        return cls(tb, AccountSettings(**result))

    # -- IMAP ---------------------------------------------------------------------------------
    def sync_folder(self, path: str = "INBOX", expect: str | None = None) -> list[dict]:
        """Folder discovery (first: the Inbox object can be replaced mid-sync otherwise), then
        an update of `path` (done when the message with Message-ID `expect` is there, if given);
        the headers Thunderbird has for the folder."""
        return self.run(r"""
const server = theAccount().incomingServer;
await discover(server);
const folder = args[1] == 'INBOX' ? inboxOf(server) : folderNamed(server, args[1]);
if (!folder) throw new Error('no folder ' + args[1] + ' among ' +
  server.rootFolder.descendants.map(f => f.URI).join(', '));
await update(folder, args[2]);
return headers(folder).map(describe);
""", path, expect)

    def stream_body(self, message_id: str, path: str = "INBOX") -> bytes:
        data = self.run(r"""
const server = theAccount().incomingServer;
const folder = args[2] == 'INBOX' ? inboxOf(server) : folderNamed(server, args[2]);
const header = findHeader(folder, args[1]);
if (!header) throw new Error('no message ' + args[1] + ' in ' + folder.URI);
return btoa(await withTimeout(streamBody(folder.getUriForMsg(header)), 20000, 'streaming'));
""", message_id, path)
        return base64.b64decode(data)

    def mark_read(self, message_id: str) -> None:
        self.run(r"""
const folder = inboxOf(theAccount().incomingServer);
const header = findHeader(folder, args[1]);
if (!header) throw new Error('no message ' + args[1]);
folder.markMessagesRead([header], true);
""", message_id)

    def mark_flagged(self, message_id: str) -> None:
        self.run(r"""
const folder = inboxOf(theAccount().incomingServer);
const header = findHeader(folder, args[1]);
if (!header) throw new Error('no message ' + args[1]);
folder.markMessagesFlagged([header], true);
""", message_id)

    def archive(self, message_id: str) -> None:
        """Thunderbird's Archive command (the "A" key): MessageArchiver, yearly folders."""
        self.run(r"""
const { MessageArchiver } = ChromeUtils.importESModule('resource:///modules/MessageArchiver.sys.mjs');
const folder = inboxOf(theAccount().incomingServer);
const header = findHeader(folder, args[1]);
if (!header) throw new Error('no message ' + args[1]);
await withTimeout(new Promise(resolve => {
  const archiver = new MessageArchiver();
  archiver.oncomplete = resolve;
  archiver.archiveMessages([header]);
}), 20000, 'archiving');
""", message_id)

    def delete_to_trash(self, message_id: str, path: str) -> None:
        """Delete as the Delete key does with the IMAP default model: move to Trash."""
        self.run(r"""
const server = theAccount().incomingServer;
await discover(server);
const folder = folderNamed(server, args[2]);
if (!folder) throw new Error('no folder ' + args[2]);
await update(folder, args[1]);
const header = findHeader(folder, args[1]);
if (!header) throw new Error('no message ' + args[1] + ' in ' + folder.URI);
await withTimeout(new Promise((resolve, reject) => folder.deleteMessages([header], null, false, true, {
  QueryInterface: ChromeUtils.generateQI(['nsIMsgCopyServiceListener']),
  onStartCopy() {}, onProgress() {}, setMessageKey() {}, getMessageId() { return null; },
  onStopCopy(status) { Components.isSuccessCode(status) ? resolve()
                       : reject(new Error('delete failed: 0x' + (status >>> 0).toString(16))); },
}, false)), 20000, 'delete');
""", message_id, path)

    def empty_trash(self) -> None:
        self.run(r"""
const server = theAccount().incomingServer;
await discover(server);
const trash = server.rootFolder.getFolderWithFlags(Ci.nsMsgFolderFlags.Trash);
if (!trash) throw new Error('no Trash folder');
// No update of Trash first: Thunderbird selects it by itself after the move, and a second
// update request for the same folder is merged into that one without calling our listener.
await withTimeout(new Promise((resolve, reject) =>
  trash.emptyTrash(urlListener(resolve, reject, 'empty trash'))), 20000, 'empty trash');
""")

    def show_inbox(self, message_id: str) -> None:
        """Select the INBOX in the 3-pane window and the message in the list (for a screenshot)."""
        self.run(r"""
const folder = inboxOf(theAccount().incomingServer);
const win = Services.wm.getMostRecentWindow('mail:3pane');
const about3Pane = win.gTabmail.currentAbout3Pane;
about3Pane.displayFolder(folder.URI);
const header = findHeader(folder, args[1]);
await new Promise(r => setTimeout(r, 300));
if (header) {
  const index = about3Pane.gDBView.findIndexOfMsgHdr(header, true);
  about3Pane.threadTree.selectedIndex = index;
}
await new Promise(r => setTimeout(r, 1200));  // let the list and message pane render
""", message_id)

    # -- sending ------------------------------------------------------------------------------
    def send(self, to: str, subject: str, body: str) -> None:
        """Compose and send as the compose window does; returns when the Sent copy is filed."""
        self.run(r"""
const acct = theAccount();
const identity = acct.defaultIdentity;
const fields = Cc['@mozilla.org/messengercompose/composefields;1']
  .createInstance(Ci.nsIMsgCompFields);
fields.from = identity.fullName + ' <' + identity.email + '>';
fields.to = args[1];
fields.subject = args[2];
fields.body = args[3];
const params = Cc['@mozilla.org/messengercompose/composeparams;1']
  .createInstance(Ci.nsIMsgComposeParams);
params.type = Ci.nsIMsgCompType.New;
params.format = Ci.nsIMsgCompFormat.PlainText;
params.identity = identity;
params.composeFields = fields;
const compose = MailServices.compose.initCompose(params, null, null);
const done = new Promise((resolve, reject) => {
  compose.RegisterStateListener({
    QueryInterface: ChromeUtils.generateQI(['nsIMsgComposeStateListener']),
    NotifyComposeFieldsReady() {}, NotifyComposeBodyReady() {}, SaveInFolderDone() {},
    // Called after the message was sent and the Sent copy (IMAP APPEND) was filed.
    ComposeProcessDone(result) {
      Components.isSuccessCode(result) ? resolve()
        : reject(new Error('sending failed: 0x' + (result >>> 0).toString(16)));
    },
  });
});
const progress = Cc['@mozilla.org/messenger/progress;1'].createInstance(Ci.nsIMsgProgress);
await compose.sendMsg(Ci.nsIMsgCompDeliverMode.Now, identity, acct.key, null, progress);
await withTimeout(done, 25000, 'sending');
""", to, subject, body, timeout=40)

    # -- POP3 ---------------------------------------------------------------------------------
    def pop3_get_new_mail(self) -> list[dict]:
        return self.run(r"""
const server = theAccount().incomingServer;
const inbox = inboxOf(server);
await withTimeout(new Promise((resolve, reject) => MailServices.pop3.GetNewMail(
  null, urlListener(resolve, reject, 'POP3 download'), inbox, server)), 20000, 'POP3 download');
return headers(inbox).map(describe);
""")

    def local_body(self, message_id: str) -> bytes:
        data = self.run(r"""
const folder = inboxOf(theAccount().incomingServer);
const header = findHeader(folder, args[1]);
if (!header) throw new Error('no message ' + args[1]);
return btoa(await withTimeout(streamBody(folder.getUriForMsg(header)), 20000, 'streaming'));
""", message_id)
        return base64.b64decode(data)


def exchange_autodiscover(tb: Thunderbird, address: str, password: str) -> dict:
    """Thunderbird's own Outlook Autodiscover client (what account setup tries for Exchange):
    POSTs the request to http://autodiscover.<domain>/autodiscover/autodiscover.xml (through the
    proxy pref) and parses the answer into incoming/outgoing server entries."""
    return tb.run(_PRELUDE + r"""
const [address, password] = args;
const { fetchConfigFromExchange } = ChromeUtils.importESModule(
  'resource:///modules/accountcreation/ExchangeAutoDiscover.sys.mjs');
Services.io.offline = false;
const config = await withTimeout(fetchConfigFromExchange(
  address.split('@')[1], address, new AbortController().signal, address, password,
  async () => false), 15000, 'Autodiscover');
const entry = s => ({ type: s.type, hostname: s.hostname, port: s.port,
                      socket_type: s.socketType, auth: s.auth, username: s.username });
return { incoming: [config.incoming, ...config.incomingAlternatives].map(entry),
         outgoing: [config.outgoing, ...(config.outgoingAlternatives || [])].map(entry) };
""", address, password)
